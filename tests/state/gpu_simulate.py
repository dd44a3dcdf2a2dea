#!/usr/bin/env python3
"""GPU suite: `eplb simulate` on device memory over RANKS GPUs (one process per GPU): async with
gloo and with cuda_ipc, sync with nccl; every committed layer verified, same-step commits. Skips (77) without GPUs."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpus import gpu_count  # noqa: E402

eplb, ranks = sys.argv[1], int(sys.argv[2])
gpus = gpu_count(eplb)
if gpus < ranks:
    print(f"skip: {ranks} ranks need {ranks} GPUs, found {gpus}")
    sys.exit(77)
env = dict(os.environ, NCCL_NVLS_ENABLE="0")
ok = True
for mode in (["--async", "--backend", "gloo", "--procs"], ["--async", "--backend", "cuda_ipc", "--procs"],
             ["--sync", "--backend", "nccl", "--procs"]):
    r = subprocess.run([eplb, "simulate", "--device", "cuda", "--ranks", str(ranks), "--steps", "1200", "--json", *mode],
                       capture_output=True, text=True, env=env, timeout=280)
    print(" ".join(mode), r.stdout.strip(), r.stderr.strip()[-2000:])
    try:
        out = json.loads(r.stdout)
        ok = ok and r.returncode == 0 and out["verified"] and out["commit_steps_consistent"] and out["rebalances"] >= 4
    except json.JSONDecodeError:
        ok = False
sys.exit(0 if ok else 1)

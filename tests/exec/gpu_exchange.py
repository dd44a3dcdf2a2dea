#!/usr/bin/env python3
"""GPU suite: `eplb exchange` on device memory over RANKS GPUs with BACKEND; skips (77) without them."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpus import gpu_count  # noqa: E402

eplb, ranks, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
gpus = gpu_count(eplb)
if gpus < ranks:
    print(f"skip: {ranks} ranks need {ranks} GPUs, found {gpus}")
    sys.exit(77)
env = dict(os.environ, NCCL_NVLS_ENABLE="0")
# A cap of 5 bundles (a layer has 9 slots per rank): the layer moves in chunks. nccl also runs with
# its staging and packing buffers registered (NCCL moves them without its own buffers over NVLink).
runs = [("0", []), (str(5 * (1048576 + 4096 + 64)), [])]
if "nccl" in backend:
    runs.append(("0", ["--register"]))
for staging, extra in runs:
    r = subprocess.run([eplb, "exchange", "--device", "cuda", "--backend", backend, "--ranks", str(ranks),
                        "--layers", "4", "--experts", str(8 * ranks), "--redundant", str(ranks),
                        "--tensor-bytes", "1048576,4096,64", "--rounds", "6", "--staging-bytes", staging, "--json"]
                       + extra, capture_output=True, text=True, env=env, timeout=280)
    print(r.stdout, r.stderr)
    out = json.loads(r.stdout)
    if r.returncode != 0 or not out["verified"]:
        sys.exit(1)

#!/usr/bin/env python3
"""Async rebalances across 4 processes over Gloo, with random delays on every host stream
operation (--inject-delay-ms) and a rebalance every few steps: hundreds of rebalances, every
committed layer verified on every rank, the same commit steps on every rank, no failure.

usage: multiproc_stress.py EPLB [BACKEND DEVICE]  (default gloo host; e.g. cuda_ipc cuda on 4 GPUs,
which skips with 77 where there are fewer)"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simulate_run import run_simulate  # noqa: E402

eplb = sys.argv[1]
backend, device = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("gloo", "host")
if device == "cuda":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from gpus import gpu_count  # noqa: E402
    if gpu_count(eplb) < 4:
        print("skip: 4 ranks need 4 GPUs")
        sys.exit(77)
min_rebalances = 100
# Steps: rebalances start load_readback_lag_steps after their trigger (issue 17), about 25 steps
# apart here, so 3000 steps give ~120.
args = ["--procs", "--backend", backend, "--device", device, "--ranks", "4", "--steps", "3000",
        "--step-interval", "3", "--commit-lag", "2", "--window", "4", "--inject-delay-ms", "1", "--bytes-scale", "64",
        "--forward-us", "0", "--seed", "5", "--timeout-ms", "20000"]
start = time.monotonic()
out, failures = run_simulate(eplb, args, 280)
took = time.monotonic() - start
if out.get("rebalances", 0) < min_rebalances:
    failures.append(f"{out.get('rebalances')} rebalances finished, expected at least {min_rebalances}")
for rank in out.get("rank_reports", []):
    if rank.get("failure"):
        failures.append(f"rank {rank.get('rank')}: {rank['failure']}")
if out.get("bytes_moved", 0) <= 0:
    failures.append("no bytes moved")
print(f"async {backend} stress ({device}): {out.get('rebalances')} rebalances on 4 processes in {took:.1f} s, "
      f"{out.get('bytes_moved')} bytes moved, step p99 {out.get('step_p99_ms', 0):.2f} ms")
if failures:
    print("\n".join(failures))
    sys.exit(1)

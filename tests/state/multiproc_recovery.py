#!/usr/bin/env python3
"""Recovery after a transient transfer fault, with real Gloo between 4 processes: `eplb simulate
--procs --backend gloo` where rank 1's communicator fails one batch after step 100 and stays broken
(as real ones do after a failed batch). Every rank must report exactly one error (rank 1 its own,
the others naming rank 1), go on serving, and finish later rebalances on communicators the state
made again itself (under a fresh store prefix, with its async settings);
every committed layer verified and committed in the same step on every rank.

usage: multiproc_recovery.py EPLB"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simulate_run import run_simulate  # noqa: E402

eplb = sys.argv[1]
args = ["--procs", "--backend", "gloo", "--ranks", "4", "--steps", "3000", "--step-interval",
        "20", "--window", "10", "--forward-us", "1000", "--timeout-ms", "1000", "--seed", "3",
        "--transfer-fault-rank", "1", "--transfer-fault-step", "100"]
out, failures = run_simulate(eplb, args, 200)
for rep in out.get("rank_reports", []):
    errors = [e["error"] for e in rep.get("errors", [])]
    want = "injected transfer fault on rank 1" if rep["rank"] == 1 else "rebalance failed on rank 1"
    if len(errors) != 1 or want not in errors[0]:
        failures.append(f"rank {rep['rank']}: expected one error containing '{want}', got {errors[:5]}")
    # The state's own communicator path made it again (generation 1), not a factory of the test.
    if rep.get("communicators_made", 0) < 2:
        failures.append(f"rank {rep['rank']}: {rep.get('communicators_made')} communicators made, expected >= 2")
after = out.get("rebalances_after_errors", 0)
if after < 10:
    failures.append(f"{after} rebalances finished after the fault, expected at least 10")
print(f"recovery over gloo: {out.get('errors')} errors, {after} of {out.get('rebalances')} rebalances after them")
for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)

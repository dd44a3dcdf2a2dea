#!/usr/bin/env python3
"""Serving on after a lost rank (issue 20): `eplb simulate --fail-rank R --fail-step S --survive`.
Threads (loopback, the rank marked dead) and, where Gloo is built, processes over Gloo where the
rank SIGKILLs itself; sync and async. The survivors must agree on the live set in the same step,
reload the experts only the dead rank held from the simulator's checkpoint, end with identical
maps, verify every committed layer before and after, and keep rebalancing; a set too small for
every expert must fail with a line naming the slots; --survive alone is refused (exit 2).

usage: simulate_survive.py EPLB gloo|none"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simulate_run import run_simulate  # noqa: E402

eplb, gloo = sys.argv[1], sys.argv[2] == "gloo"
failures = []


def check_survived(name, args, ranks, dead):
    out, fails = run_simulate(eplb, args, 240)
    failures.extend(f"{name}: {f}" for f in fails)
    if out.get("failure"):
        failures.append(f"{name}: failure {out['failure']}")
    sets = out.get("rank_sets", [])
    if len(sets) != 2 or sets[1].get("num_ranks") != ranks - 1 or sets[1].get("lost_ranks") != [dead]:
        failures.append(f"{name}: rank sets {sets}")
        return
    after = [r for r in out.get("rebalance_log", []) if r.get("trigger_step", 0) > sets[1]["step"]]
    if len(after) < 3:
        failures.append(f"{name}: {len(after)} rebalances after the recovery at step {sets[1]['step']}")
    print(f"{name}: recovered at step {sets[1]['step']} on {sets[1]['num_ranks']} ranks, "
          f"{sets[1]['experts_reloaded']} experts reloaded, {len(after)} rebalances after")


common = ["--steps", "700", "--step-interval", "40", "--window", "20", "--forward-us", "300"]
for mode in ([], ["--sync"]):
    label = "sync" if mode else "async"
    check_survived(f"threads {label}", ["--ranks", "8", "--fail-rank", "1", "--fail-step", "150", "--survive",
                                        "--timeout-ms", "1000", *common, *mode], 8, 1)
    if gloo:
        check_survived(f"gloo processes {label} (SIGKILL)",
                       ["--procs", "--backend", "gloo", "--ranks", "6", "--fail-rank", "2", "--fail-step", "150",
                        "--survive", "--timeout-ms", "2000", *common, *mode], 6, 2)

# Four ranks of the tiny preset hold 20 slots for 16 experts: three cannot hold them all.
r = subprocess.run([eplb, "simulate", "--json", "--ranks", "4", "--fail-rank", "1", "--fail-step", "100",
                    "--survive", "--timeout-ms", "1000", "--steps", "400"], capture_output=True, text=True,
                   timeout=120)
want = "recover: the 3 surviving ranks have 15 slots for 16 experts (ranks 1 were lost)"
if r.returncode == 0 or want not in json.loads(r.stdout).get("failure", ""):
    failures.append(f"too few slots: exit {r.returncode}, {r.stdout[-400:]}")

r = subprocess.run([eplb, "simulate", "--survive"], capture_output=True, text=True, timeout=30)
if r.returncode != 2 or "--survive needs --fail-rank and --fail-step" not in r.stderr:
    failures.append(f"--survive alone: exit {r.returncode}, {r.stderr}")

for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)

#!/usr/bin/env python3
"""Elastic EP and serving on after a lost rank (issue 20), through `eplb simulate`.

`--scale STEP:SIZE,...`: 8 ranks -> 6 (the highest leave) -> 9 (three join) -> 7, as threads
(loopback) and as Gloo processes, sync and async: every rank of every set verifies every layer
after each change and every commit, commits in the same steps as rank 0 over the steps it served,
and the final set's ranks meet at the end. Bad --scale values are refused with exit 2.

`--fail-rank R --fail-step S --survive`:
Threads (loopback, the rank marked dead) and, where Gloo is built, processes over Gloo where the
rank SIGKILLs itself; sync and async; with --no-reload (no checkpoint) the experts lost with the
rank are masked. The survivors must agree on the live set in the same step,
reload the experts only the dead rank held from the simulator's checkpoint, end with identical
maps, verify every committed layer before and after, and keep rebalancing; a killed process is
known dead from its pid, so recover() takes well under its window (twice the timeout); a set too small for
every expert must fail with a line naming the slots; --survive alone is refused (exit 2).

usage: simulate_elastic.py EPLB gloo|none"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simulate_run import run_simulate  # noqa: E402

eplb, gloo = sys.argv[1], sys.argv[2] == "gloo"
failures = []


def check_survived(name, args, ranks, dead, fast_within=None):
    out, fails = run_simulate(eplb, args, 240)
    failures.extend(f"{name}: {f}" for f in fails)
    if out.get("failure"):
        failures.append(f"{name}: failure {out['failure']}")
    sets = out.get("rank_sets", [])
    # A stall past the timeout under load (CI) may make every rank recover once with nobody lost.
    stalls = [s for s in sets[1:] if s.get("lost_ranks") == [] and s.get("num_ranks") == ranks]
    sets = sets[:1] + [s for s in sets[1:] if s not in stalls]
    if len(sets) != 2 or sets[1].get("num_ranks") != ranks - 1 or sets[1].get("lost_ranks") != [dead]:
        failures.append(f"{name}: rank sets {out.get('rank_sets')}")
        return
    if stalls:
        print(f"{name}: {len(stalls)} recoveries with nobody lost (a stall past the timeout)")
    if "--no-reload" in args:
        # Nothing loaded back: every expert lost with the rank is masked, the re-plan keeps them out.
        if sets[1].get("experts_reloaded") != 0 or not sets[1].get("masked") or sets[1].get("replan_error"):
            failures.append(f"{name}: masked {sets[1]}")
    elif sets[1].get("masked"):
        failures.append(f"{name}: masked with a checkpoint to reload from: {sets[1]}")
    # A killed process on this host is known dead at once (its posted pid is gone): recover() does not
    # wait out its window (twice the timeout) for it.
    if fast_within is not None and sets[1].get("seconds", 1e9) > fast_within:
        failures.append(f"{name}: recover() took {sets[1].get('seconds')} s, more than {fast_within} s")
    after = [r for r in out.get("rebalance_log", []) if r.get("trigger_step", 0) > sets[1]["step"]]
    if len(after) < 3:
        failures.append(f"{name}: {len(after)} rebalances after the recovery at step {sets[1]['step']}")
    print(f"{name}: recovered at step {sets[1]['step']} on {sets[1]['num_ranks']} ranks in {sets[1].get('seconds')} s, "
          f"{sets[1]['experts_reloaded']} experts reloaded, {len(after)} rebalances after")


common = ["--steps", "700", "--step-interval", "40", "--window", "20", "--forward-us", "300"]
for mode in ([], ["--sync"]):
    label = "sync" if mode else "async"
    check_survived(f"threads {label}", ["--ranks", "8", "--fail-rank", "1", "--fail-step", "150", "--survive",
                                        "--timeout-ms", "1000", *common, *mode], 8, 1)
    if gloo:
        check_survived(f"gloo processes {label} (SIGKILL)",
                       ["--procs", "--backend", "gloo", "--ranks", "6", "--fail-rank", "2", "--fail-step", "150",
                        "--survive", "--timeout-ms", "3000", *common, *mode], 6, 2, fast_within=4.5)
    # No checkpoint: the tiny preset's 8 ranks hold 24 slots for 16 experts, so some experts live on
    # rank 1 only and are masked (the router sends them no token) while the survivors serve on.
    check_survived(f"threads {label} (no reload: masked)",
                   ["--ranks", "8", "--fail-rank", "1", "--fail-step", "150", "--survive", "--no-reload",
                    "--timeout-ms", "1000", *common, *mode], 8, 1)
    if gloo and mode:
        check_survived("gloo processes sync (SIGKILL, no reload: masked)",
                       ["--procs", "--backend", "gloo", "--ranks", "6", "--fail-rank", "2", "--fail-step", "150",
                        "--survive", "--no-reload", "--timeout-ms", "3000", *common, *mode], 6, 2, fast_within=4.5)

def check_scaled(name, args):
    out, fails = run_simulate(eplb, args, 300)
    failures.extend(f"{name}: {f}" for f in fails)
    if out.get("failure"):
        failures.append(f"{name}: failure {out['failure']}")
    sizes = [s.get("num_ranks") for s in out.get("rank_sets", [])]
    if sizes != [6, 9, 7]:
        failures.append(f"{name}: rank sets {out.get('rank_sets')}")
    left = sorted(r["rank"] for r in out.get("rank_reports", []) if r.get("left"))
    if left != [6, 7, 7, 8]:  # 6, 7 leave at 150; 7 and 8 (joined at 300) at 450
        failures.append(f"{name}: ranks that left {left}")
    print(f"{name}: rank sets {sizes}, {out.get('rebalances')} rebalances, "
          f"{[round(s.get('seconds', 0), 3) for s in out.get('rank_sets', [])]} s per rescale")


scale = ["--ranks", "8", "--scale", "150:6,300:9,450:7", "--steps", "600", "--step-interval", "40",
         "--window", "20", "--forward-us", "300", "--timeout-ms", "3000"]
for mode in ([], ["--sync"]):
    label = "sync" if mode else "async"
    check_scaled(f"scale threads {label}", [*scale, *mode])
    if gloo:
        check_scaled(f"scale gloo processes {label}", ["--procs", "--backend", "gloo", *scale, *mode])

for bad, want in ((["--ranks", "4", "--scale", "150:3"], "--scale: 3 ranks x 5 slots at step 150 cannot hold 16"),
                  (["--scale", "abc"], "--scale: 'abc' is not STEP:SIZE"),
                  (["--scale", "300:6,200:5"], "--scale: step 200 must be after 300"),
                  (["--scale", "100:4"], "--scale: size 4 at step 100 must be 1..64 and differ from 4")):
    r = subprocess.run([eplb, "simulate", *bad], capture_output=True, text=True, timeout=30)
    if r.returncode != 2 or want not in r.stderr:
        failures.append(f"{bad}: exit {r.returncode}, {r.stderr.strip()}")

# Four ranks of the tiny preset hold 20 slots for 16 experts: three cannot hold them all.
r = subprocess.run([eplb, "simulate", "--json", "--ranks", "4", "--fail-rank", "1", "--fail-step", "100",
                    "--survive", "--timeout-ms", "1000", "--steps", "400"], capture_output=True, text=True,
                   timeout=120)
want = "recover: the 3 surviving ranks have 15 slots for 16 experts (ranks 1 were lost)"
if r.returncode == 0 or want not in json.loads(r.stdout).get("failure", ""):
    failures.append(f"too few slots: exit {r.returncode}, {r.stdout[-400:]}")

r = subprocess.run([eplb, "simulate", "--no-reload"], capture_output=True, text=True, timeout=30)
if r.returncode != 2 or "--no-reload needs --survive" not in r.stderr:
    failures.append(f"--no-reload alone: exit {r.returncode}, {r.stderr}")

r = subprocess.run([eplb, "simulate", "--survive"], capture_output=True, text=True, timeout=30)
if r.returncode != 2 or "--survive needs --fail-rank and --fail-step" not in r.stderr:
    failures.append(f"--survive alone: exit {r.returncode}, {r.stderr}")

for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)

#!/usr/bin/env python3
"""A randomized campaign over elastic EP (issue 20) through `eplb simulate`: random rank-set changes
(sizes, steps, a change a few steps after another or in the middle of an async rebalance) and ranks
lost at random steps (a checkpoint to reload from or not), sync and async, threads and Gloo
processes. Every run must verify every committed layer on every rank, commit in the same steps, go
through exactly the rank sets it was given, and never leave an expert without a replica where a
checkpoint could reload it; a lost rank that leaves too few slots must fail with the line that says so.

usage: elastic_campaign.py EPLB gloo|none [CASES]   (EPLB_CAMPAIGN_SEED replays a campaign)"""
import math
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "state"))
from simulate_run import run_simulate  # noqa: E402

eplb, gloo = sys.argv[1], sys.argv[2] == "gloo"
cases = int(sys.argv[3]) if len(sys.argv) > 3 else 10
seed = int(os.environ.get("EPLB_CAMPAIGN_SEED", random.randrange(1 << 30)))
rng = random.Random(seed)
failures = []
print(f"elastic campaign: seed {seed} (EPLB_CAMPAIGN_SEED={seed} replays it), {cases} cases")

EXPERTS, MIN_SLOTS = 16, 20  # the tiny preset: 16 experts, 4 redundant; slots grow to divide the ranks


def slots_per_rank(ranks):
    return math.ceil(MIN_SLOTS / ranks)


def common(sync, procs, timeout_ms):
    args = ["--step-interval", str(rng.choice([10, 25, 40])), "--window", "20", "--forward-us", "300",
            "--timeout-ms", str(timeout_ms), "--seed", str(rng.randrange(1000))]
    if sync:
        args.append("--sync")
    if procs:
        args += ["--procs", "--backend", "gloo"]
    return args


def scale_case(label, sync, procs):
    ranks = rng.randrange(3, 8)
    spr = slots_per_rank(ranks)
    smallest = math.ceil(EXPERTS / spr)
    schedule, step, size = [], 0, ranks
    for _ in range(rng.randrange(1, 4)):
        # Sometimes a change a few steps after the last one (its rebalance may still be in flight).
        step += rng.choice([rng.randrange(2, 8), rng.randrange(30, 160)])
        size = rng.choice([s for s in range(max(2, smallest), 10) if s != size])
        schedule.append((step, size))
    steps = step + rng.randrange(120, 250)
    args = ["--ranks", str(ranks), "--scale", ",".join(f"{s}:{n}" for s, n in schedule), "--steps", str(steps),
            *common(sync, procs, 3000 if procs else 2000)]
    label += f" scale {ranks} -> {schedule}"
    out, fails = run_simulate(eplb, args, 300)
    failures.extend(f"{label}: {f}" for f in fails)
    sizes = [s.get("num_ranks") for s in out.get("rank_sets", [])]
    if sizes != [n for _, n in schedule]:
        failures.append(f"{label}: rank sets {out.get('rank_sets')}")
    if any(s.get("masked") for s in out.get("rank_sets", [])):
        failures.append(f"{label}: experts without a replica after a rescale: {out.get('rank_sets')}")
    print(f"{label}: {sizes}, {out.get('rebalances')} rebalances, "
          f"{[round(s.get('seconds', 0), 3) for s in out.get('rank_sets', [])]} s per change")
    return args


def survive_case(label, sync, procs):
    ranks = rng.randrange(4, 9)
    dead, step = rng.randrange(ranks), rng.randrange(5, 300)
    no_reload = rng.random() < 0.35
    timeout_ms = 3000 if procs else 1000
    args = ["--ranks", str(ranks), "--fail-rank", str(dead), "--fail-step", str(step), "--survive",
            "--steps", str(step + 400), *common(sync, procs, timeout_ms)] + (["--no-reload"] if no_reload else [])
    label += f" rank {dead} of {ranks} lost at step {step}{' (no reload)' if no_reload else ''}"
    out, fails = run_simulate(eplb, args, 300)
    spr = slots_per_rank(ranks)
    if (ranks - 1) * spr < EXPERTS:
        want = f"recover: the {ranks - 1} surviving ranks have {(ranks - 1) * spr} slots for {EXPERTS} experts"
        if want not in out.get("failure", ""):
            failures.append(f"{label}: wanted '{want}', got {out.get('failure')!r}")
        print(f"{label}: too few slots, refused")
        return args
    failures.extend(f"{label}: {f}" for f in fails)
    # A stall past the timeout under load may make every rank recover once with nobody lost.
    sets = [s for s in out.get("rank_sets", [])[1:] if s.get("lost_ranks") != []]
    if len(sets) != 1 or sets[0].get("lost_ranks") != [dead] or sets[0].get("num_ranks") != ranks - 1:
        failures.append(f"{label}: rank sets {out.get('rank_sets')}")
        return args
    if not no_reload and sets[0].get("masked"):
        failures.append(f"{label}: masked with a checkpoint to reload from: {sets[0]}")
    if no_reload and sets[0].get("experts_reloaded"):
        failures.append(f"{label}: reloaded without a checkpoint: {sets[0]}")
    print(f"{label}: recovered at step {sets[0]['step']}, {sets[0].get('experts_reloaded')} reloaded, "
          f"{len(sets[0].get('masked') or [])} masked, {out.get('rebalances')} rebalances")
    return args


for i in range(cases):
    sync, procs = rng.random() < 0.5, gloo and rng.random() < 0.3
    label = f"case {i} ({'sync' if sync else 'async'}, {'gloo processes' if procs else 'threads'}):"
    before = len(failures)
    args = (scale_case if rng.random() < 0.5 else survive_case)(label, sync, procs)
    if len(failures) > before:
        print(f"  replay: eplb simulate --json {' '.join(args)}")
for f in failures:
    print("FAIL", f)
print(f"elastic campaign (seed {seed}): {'FAILED' if failures else 'all checks passed'}")
sys.exit(1 if failures else 0)

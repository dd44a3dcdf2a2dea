#!/usr/bin/env python3
"""Issue 17 item 2: stop() returns within a bound well under a second whatever is in flight, over Gloo
between processes. `eplb simulate --procs --backend gloo` with 4 rank processes, sync and async:
one rank calls stop() at a random step (--stop-rank/--stop-step: before, while planning, mid-transfer
or mid-agreement), its peers must be told (an error naming it, well before the timeout) and then stop
themselves; in a few runs one rank is SIGKILLed or SIGSTOPped instead and the survivors, once they
have noticed, stop with a dead or frozen peer. Every rank reports how long its stop() took (stop_ms);
the worst must stay under BOUND_MS, and every stopped rank's live weights must be intact.

usage: stop_bound.py EPLB [RUNS]   (EPLB_STOP_SEED replays a run)"""
import json
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rank_procs import rank_pids, signal_rank  # noqa: E402

eplb = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 28
seed = int(os.environ.get("EPLB_STOP_SEED", time.time_ns() % 1_000_000))
rng = random.Random(seed)
TIMEOUT_MS = 3000
BOUND_MS = 500
RANKS = 4
failures = []
stops = []  # (ms, where)


def base(mode, steps):
    return [eplb, "simulate", "--procs", "--backend", "gloo", "--ranks", str(RANKS), "--steps", str(steps),
            f"--{mode}", "--step-interval", "30", "--window", "20", "--forward-us", "300",
            "--timeout-ms", str(TIMEOUT_MS), "--json"]


def collect(label, out, err, victim, told):
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        failures.append(f"{label}: no JSON report: {out[-300:]!r} {err[-500:]!r}")
        return
    for d in report.get("rank_reports", []):
        r = d["rank"]
        if "stop_ms" not in d:
            if r != victim:
                failures.append(f"{label}: rank {r} reported no stop() ({d['failure'][:120]!r})")
            continue
        stops.append((d["stop_ms"], f"{label} rank {r}"))
        if d.get("weights_intact") is False:
            failures.append(f"{label}: rank {r} weights not intact")
        # Told, not timed out: a peer failure naming a rank that stopped (the victim, or a peer that
        # stopped after hearing of it).
        if told and r != victim and d["failure"] and not (d["failure"].startswith(f"rank {r}: [peer_failure]") and
                                                          "stop" in d["failure"]):
            failures.append(f"{label}: rank {r} was not told of the stop: {d['failure'][:160]!r}")


def stop_run(i):
    mode = "async" if i % 2 == 0 else "sync"
    victim = rng.randrange(RANKS)
    step = rng.randrange(10, 330)
    label = f"run {i} ({mode}, rank {victim} stops at step {step})"
    p = subprocess.run(base(mode, 360) + ["--stop-rank", str(victim), "--stop-step", str(step)],
                       capture_output=True, text=True, timeout=120)
    collect(label, p.stdout, p.stderr, victim, told=True)


def signal_run(i, sig):
    mode = "async" if i % 2 == 0 else "sync"
    victim = 1 + rng.randrange(RANKS - 1)  # not rank 0, whose process writes the report
    label = f"run {i} ({mode}, rank {victim} {sig.name})"
    parent = subprocess.Popen(base(mode, 100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    pids = {}
    while time.monotonic() < deadline and len(pids) < RANKS:
        time.sleep(0.05)
        pids = rank_pids(parent.pid)
    if len(pids) < RANKS:
        parent.kill()
        failures.append(f"{label}: rank processes did not start")
        return
    time.sleep(0.5 + rng.random())  # a few rebalances in: one is often in flight
    ended = signal_rank(parent, pids[victim], sig, 2 * TIMEOUT_MS / 1000 + 30)
    if ended is None:
        failures.append(f"{label}: the run hung")
        return
    collect(label, *ended, victim, told=False)


for i in range(runs):
    stop_run(i)
signal_run(runs, signal.SIGKILL)
signal_run(runs + 1, signal.SIGSTOP)

stops.sort()
if len(stops) < 100:
    failures.append(f"only {len(stops)} stop() calls measured, want 100+")
if stops:
    worst = stops[-1]
    p99 = stops[min(len(stops) - 1, len(stops) * 99 // 100)][0]
    print(f"stop bound (gloo processes, seed {seed}): {len(stops)} stops, worst {worst[0]:.1f} ms ({worst[1]}), "
          f"p99 {p99:.1f} ms, median {stops[len(stops) // 2][0]:.1f} ms")
    for ms, where in stops:
        if ms >= BOUND_MS:
            failures.append(f"{where}: stop() took {ms:.1f} ms, bound {BOUND_MS} ms")
for f in failures:
    print("FAIL", f)
print("stop bound:", "FAILED" if failures else "all checks passed", f"(EPLB_STOP_SEED={seed})")
sys.exit(1 if failures else 0)

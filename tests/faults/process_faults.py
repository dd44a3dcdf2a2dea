#!/usr/bin/env python3
"""Process faults during async rebalances: `eplb simulate --procs --backend gloo` with 4 rank
processes; one rank is killed (SIGKILL) or stopped (SIGSTOP) while rebalances are in flight. The
survivors must report an error naming that rank within twice the configured timeout (plus start-up
slack), never hang, keep every layer's weights exactly as their committed maps say, and the run must
exit non-zero."""
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rank_procs import rank_pids  # noqa: E402

eplb = sys.argv[1]
TIMEOUT_MS = 2000
failures = []


def run_case(sig, victim=2):
    cmd = [eplb, "simulate", "--procs", "--backend", "gloo", "--ranks", "4", "--steps", "100000",
           "--step-interval", "30", "--window", "20", "--forward-us", "300", "--timeout-ms", str(TIMEOUT_MS), "--json"]
    parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    kids = []
    while time.monotonic() < deadline and len(kids) < 4:
        time.sleep(0.1)
        kids = [(p, r) for r, p in rank_pids(parent.pid).items()]
    if len(kids) < 4:
        parent.kill()
        failures.append(f"{sig.name}: rank processes did not start")
        return
    time.sleep(1.5)  # a few rebalances in: layers are being staged and committed
    pid = dict((r, p) for p, r in kids)[victim]
    os.kill(pid, sig)
    hit = time.monotonic()
    try:
        out, err = parent.communicate(timeout=2 * TIMEOUT_MS / 1000 + 15)
    except subprocess.TimeoutExpired:
        parent.kill()
        failures.append(f"{sig.name}: the run hung")
        return
    took = time.monotonic() - hit
    if sig == signal.SIGSTOP:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if parent.returncode == 0:
        failures.append(f"{sig.name}: exit status 0 after a rank failed")
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        failures.append(f"{sig.name}: no JSON report: {out!r} {err[-500:]!r}")
        return
    survivors = [d for d in report.get("rank_reports", []) if d["rank"] != victim]
    for d in survivors:
        if f"rank {victim}" not in d["failure"]:
            failures.append(f"{sig.name}: rank {d['rank']} does not name rank {victim}: {d['failure']!r}")
        if d.get("weights_intact") is not True:
            failures.append(f"{sig.name}: rank {d['rank']} weights not intact ({d})")
    # Survivors report within twice the timeout; the stopped rank is then reaped after its grace.
    limit = 2 * TIMEOUT_MS / 1000 + (2 * TIMEOUT_MS / 1000 + 2 if sig == signal.SIGSTOP else 0) + 3
    if took > limit:
        failures.append(f"{sig.name}: took {took:.1f} s to end, limit {limit:.1f} s")
    print(f"{sig.name}: ended {took:.1f} s after the signal; survivors: {[d['failure'][:90] for d in survivors]}")


run_case(signal.SIGKILL)
run_case(signal.SIGSTOP)
if failures:
    print("\n".join(failures))
    sys.exit(1)
print("process faults: all checks passed")

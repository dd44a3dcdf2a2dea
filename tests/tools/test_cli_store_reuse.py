#!/usr/bin/env python3
"""Issue 15 item 9: a store outlives a run. Two ranks started by hand (--rank, Gloo) meet through
the same file-store directory twice, and through a tcp-serve; each run works under its own run-K
prefix, so the second run succeeds. A rank started alone on a store used before fails within about
the timeout with a line naming the run and the missing rank, not a Gloo connect error.

usage: test_cli_store_reuse.py EPLB"""
import subprocess
import sys
import tempfile
import time
import socket

eplb = sys.argv[1]
failures = []
BASE = ["simulate", "--procs", "--backend", "gloo", "--ranks", "2", "--steps", "200", "--json"]


def run_pair(store0, store1, label):
    procs = [subprocess.Popen([eplb, *BASE, "--rank", str(r), "--store", s, "--timeout-ms", "5000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, s in ((0, store0), (1, store1))]
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            failures.append(f"{label}: rank {r} exit {p.returncode}: {err[-400:]}")


with tempfile.TemporaryDirectory() as d:
    run_pair(d, d, "first run on a fresh directory")
    run_pair(d, d, "second run on the same directory")
    start = time.monotonic()
    r = subprocess.run([eplb, *BASE, "--rank", "0", "--store", d, "--timeout-ms", "1000"],
                       capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    want = "is in run 2 of this store; ranks 1 did not join it within 1000 ms"
    if r.returncode == 0 or want not in r.stderr:
        failures.append(f"a rank alone on a used store: exit {r.returncode}, stderr {r.stderr[-400:]!r}")
    if took > 5:
        failures.append(f"a rank alone on a used store took {took:.1f} s to fail")

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
run_pair(f"tcp-serve:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", "tcp-serve")

for f in failures:
    print("FAIL", f)
print("store reuse:", "FAILED" if failures else "all checks passed")
sys.exit(1 if failures else 0)

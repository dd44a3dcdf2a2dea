#!/usr/bin/env python3
"""Issue 15: a timeout shorter than the injected stream delay. The waits time out while the host
streams still run the queued copies; every command must end with a clean error (exit 1, the
timeout named) and never free memory under those copies (no sanitizer report, no heap abort)."""
import json
import subprocess
import sys

eplb = sys.argv[1]
failures = []
RUNS = 3

# What a use-after-free shows as: sanitizer reports, glibc heap checks, signals.
CRASH_SIGNS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "tcache", "double free", "corrupted",
               "free(): invalid", "malloc(): ")


def expect(cond, what):
    if not cond:
        failures.append(what)


def run_failing(args, timeout=240):
    r = subprocess.run([eplb, *args], capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    crash = [s for s in CRASH_SIGNS if s in out]
    expect(not crash, f"{args}: {crash} in output:\n{out[-3000:]}")
    expect(r.returncode == 1, f"{args}: exit {r.returncode} (expected a clean error exit 1):\n{out[-3000:]}")
    return r


for i in range(RUNS):
    r = run_failing(["exchange", "--timeout-ms", "1", "--inject-delay-ms", "20", "--json"])
    if r.returncode == 1:
        doc = json.loads(r.stdout)
        expect(not doc["verified"], f"exchange run {i}: verified despite the timeout: {doc}")
        expect("timeout" in doc.get("failure", ""), f"exchange run {i}: the failure does not name the timeout: {doc}")

for i in range(RUNS):
    r = run_failing(["simulate", "--json", "--inject-delay-ms", "40", "--timeout-ms", "100", "--steps", "200"])
    if r.returncode == 1:
        doc = json.loads(r.stdout)
        expect(not doc["verified"], f"simulate run {i}: verified despite the timeouts: {doc}")
        expect("timeout" in doc.get("failure", ""), f"simulate run {i}: the failure does not name a timeout: {doc}")

# The plain text output of the same exchange: one failure line, the same clean exit.
run_failing(["exchange", "--timeout-ms", "1", "--inject-delay-ms", "20"])

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("ok: timed-out waits end in clean errors")

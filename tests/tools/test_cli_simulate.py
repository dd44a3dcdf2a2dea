#!/usr/bin/env python3
"""End-to-end checks of `eplb simulate` and `eplb info`: verified runs (threads and processes, sync
and async), a rank that dies is named by the others with a non-zero exit, bad flags exit 2."""
import json
import subprocess
import sys

eplb = sys.argv[1]
with_gloo = len(sys.argv) > 2 and sys.argv[2] == "gloo"
failures = []


def run(args, timeout=120):
    return subprocess.run([eplb, *args], capture_output=True, text=True, timeout=timeout)


def expect(cond, what):
    if not cond:
        failures.append(what)


def check_ok(args, min_rebalances=2):
    r = run(["simulate", "--json", *args])
    expect(r.returncode == 0, f"{args}: exit {r.returncode}: {r.stdout} {r.stderr}")
    if r.returncode == 0:
        out = json.loads(r.stdout)
        expect(out["verified"] and out["commit_steps_consistent"], f"{args}: {out}")
        expect(out["rebalances"] >= min_rebalances, f"{args}: {out['rebalances']} rebalances")
        expect(out["balancedness_after"] > out["balancedness_before"], f"{args}: balancedness did not improve")
        for key in ("bytes_moved", "step_p50_ms", "step_p99_ms"):
            expect(key in out, f"{args}: {key} missing")


check_ok(["--steps", "700"])
check_ok(["--steps", "700", "--sync", "--ranks", "2"])
check_ok(["--steps", "500", "--inject-delay-ms", "1", "--seed", "7"])
if with_gloo:
    # Gloo staging is slower (much slower under sanitizers): fewer rebalances finish in the run.
    check_ok(["--steps", "1000", "--backend", "gloo"], 1)
    check_ok(["--steps", "1000", "--procs", "--backend", "gloo"], 1)

r = run(["simulate", "--json", "--steps", "600", "--fail-rank", "1", "--fail-step", "120", "--timeout-ms", "1500"])
expect(r.returncode != 0, "a dead rank must give a non-zero exit")
out = json.loads(r.stdout) if r.stdout.startswith("{") else {}
expect("rank 1" in out.get("failure", ""), f"the failure must name rank 1: {out.get('failure')}")

r = run(["simulate", "--preset", "huge"])
expect(r.returncode == 2 and "--preset: unknown preset \"huge\"" in r.stderr, f"bad preset: {r.returncode} {r.stderr}")
r = run(["simulate", "--ranks", "3"])
expect(r.returncode == 2 and "--ranks: 3 does not divide" in r.stderr, f"bad ranks: {r.returncode} {r.stderr}")
r = run(["simulate", "--sync", "--async"])
expect(r.returncode == 2 and "exclude each other" in r.stderr, f"sync+async: {r.returncode} {r.stderr}")
r = run(["simulate", "--device", "tpu"])
expect(r.returncode == 2 and "unknown device backend \"tpu\"" in r.stderr, f"bad device: {r.stderr}")

r = run(["info"])
expect(r.returncode == 0 and "loopback" in r.stdout and "runnable" in r.stdout, f"info: {r.stdout}")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("cli simulate: all checks passed")

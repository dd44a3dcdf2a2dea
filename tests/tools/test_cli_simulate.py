#!/usr/bin/env python3
"""End-to-end checks of `eplb simulate` and `eplb info`: verified runs (threads and processes, sync
and async), a rank that dies is named by the others with a non-zero exit, bad flags exit 2."""
import json
import subprocess
import sys
import time

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
# Issue 21: a preset accepts any rank count, growing its redundant slots (and shrinking its nodes)
# to fit, and says so; --policy picks the placement policy; progress goes to stderr only.
r = run(["simulate", "--json", "--ranks", "3", "--steps", "500", "--policy", "min_move"])
out = json.loads(r.stdout) if r.stdout.startswith("{") else {}
expect(r.returncode == 0 and out.get("verified") and out.get("policy") == "min_move"
       and "5 redundant slots instead of 4" in out.get("preset_adjusted", "")
       and len(out.get("rebalance_log", [])) == out.get("rebalances", -1) >= 1, f"3 ranks: {r.returncode} {out}")
r = run(["simulate", "--ranks", "6", "--preset", "deepseek-v3", "--steps", "20"])
expect(r.returncode == 0 and "preset adjusted: 2 nodes instead of 4" in r.stdout, f"6 ranks: {r.stdout}")
r = run(["simulate", "--steps", "300"])
expect(r.returncode == 0 and "step 30/300: balancedness -," in r.stderr and "/300" not in r.stdout
       and r.stdout.startswith("eplb simulate:"), f"progress: {r.stdout!r} {r.stderr!r}")
r = run(["simulate", "--steps", "600", "--fail-rank", "1", "--fail-step", "120", "--timeout-ms", "1500"])
expect("injected: rank 1 died at step 120; the 3 other ranks' weights verified intact" in r.stdout,
       f"fail-rank summary: {r.stdout}")

# Help: every option of every command has a description, and the ones with a value show its default.
for command in ("simulate", "exchange"):
    r = run([command, "--help"])
    lines = r.stdout.splitlines() + [""]
    options = [(line, lines[i + 1]) for i, line in enumerate(lines) if line.startswith("  --")]
    # The text is in the column after the name, or on the next line when the name is long.
    bare = [line for line, after in options
            if not line[30:].strip() and not (after.startswith(" " * 30) and after.strip())]
    expect(r.returncode == 0 and len(options) > 15 and not bare, f"{command} --help: options without text: {bare}")
    numeric = [line for line, _ in options if " INT" in line or " UINT" in line]
    expect(numeric and all("=" in line.split()[1] for line in numeric), f"{command} --help: defaults missing: {numeric}")
r = run(["simulate", "--sync", "--async"])
expect(r.returncode == 2 and "exclude each other" in r.stderr, f"sync+async: {r.returncode} {r.stderr}")
r = run(["simulate", "--device", "tpu"])
expect(r.returncode == 2 and "unknown device backend \"tpu\"" in r.stderr, f"bad device: {r.stderr}")

# Issue 15: every numeric flag is range-checked, CLI11's parse errors too: one line naming the flag,
# exit 2, at once.
limit = "must be in 1..86400000 ms"
bad_flags = [
    (["simulate", "--drift-steps", "0"], "--drift-steps: must be in 1.."),
    (["simulate", "--timeout-ms", "0"], "--timeout-ms: 0 is not allowed (" + limit),
    (["simulate", "--timeout-ms", "-5"], "--timeout-ms: -5 is not allowed (" + limit),
    (["simulate", "--timeout-ms", "86400001"], "--timeout-ms: 86400001 is not allowed (" + limit),
    (["simulate", "--timeout-ms", "9223372036854775807"], "--timeout-ms: 9223372036854775807 is not allowed"),
    (["exchange", "--timeout-ms", "0"], "--timeout-ms: 0 is not allowed (" + limit),
    (["exchange", "--timeout-ms", "9223372036854775807"], "--timeout-ms: 9223372036854775807 is not allowed"),
    (["exchange", "--tensor-bytes", "-1"], '--tensor-bytes: "-1" is not a byte count'),
    (["exchange", "--tensor-bytes", "4096, 5"], '--tensor-bytes: " 5" is not a byte count'),
    (["exchange", "--tensor-bytes", "8589934592"], "--tensor-bytes: sizes must be in 1..4294967296"),
    (["exchange", "--layers", "5000", "--tensor-bytes", "4294967296"], "at most 64 GiB"),
    (["exchange", "--staging-bytes", "-1"], "--staging-bytes: must be a whole number >= 0, got -1"),
    (["exchange", "--seed", "-1"], "--seed: must be a whole number >= 0, got -1"),
    (["exchange", "--rounds", "-1"], "--rounds: must be in 0..1000000, got -1"),
    (["exchange", "--layers", "0"], "--layers: must be in 1..10000, got 0"),
    (["exchange", "--inject-delay-ms", "-1"], "--inject-delay-ms: must be in 0..60000, got -1"),
    (["exchange", "--inject-fail-op", "-2"], "--inject-fail-op: must be in -1.."),
    (["exchange", "--fault-rank", "7"], "--fault-rank: must be in -1..1, got 7"),
    (["exchange", "--rank", "5"], "--rank: 5 is not a rank (0..1)"),
    (["exchange", "--rank", "-3"], "--rank: -3 is not a rank"),
    (["simulate", "--seed", "-1"], "--seed: must be a whole number >= 0, got -1"),
    (["simulate", "--bytes-scale", "-1"], "--bytes-scale: must be a whole number >= 0, got -1"),
    (["simulate", "--steps", "abc"], "--steps"),
    (["simulate", "--steps", "0"], "--steps: must be in 1..10000000, got 0"),
    (["simulate", "--steps", "99999999999"], "--steps"),
    (["simulate", "--tokens", "-1"], "--tokens: must be in 1..1048576, got -1"),
    (["simulate", "--window", "-1"], "--window: must be in 0.."),
    (["simulate", "--preset", "deepseek-v3", "--ranks", "4", "--window", "100000000"], "--window: 100000000 steps"),
    (["simulate", "--step-interval", "-1"], "--step-interval: must be in 0.."),
    (["simulate", "--commit-lag", "1001"], "--commit-lag: must be in -1..1000, got 1001"),
    (["simulate", "--forward-us", "-1"], "--forward-us: must be in 0..1000000, got -1"),
    (["simulate", "--inject-delay-ms", "-1"], "--inject-delay-ms: must be in 0..60000, got -1"),
    (["simulate", "--fail-rank", "-2", "--fail-step", "5"], "--fail-rank: must be in -1..3, got -2"),
    (["simulate", "--fail-rank", "1", "--fail-step", "0"], "--fail-step: must be in 1..2000, got 0"),
    (["simulate", "--transfer-fault-rank", "1", "--transfer-fault-step", "3000"],
     "--transfer-fault-step: must be in 1..2000, got 3000"),
    (["simulate", "--rank", "-2"], "--rank: -2 is not a rank"),
    (["simulate", "--no-such-flag"], "--no-such-flag"),
    (["simulate", "--rank", "0", "--store", "/tmp", "--result", "/nonexistent/dir/result.json"],
     "--result /nonexistent/dir/result.json: cannot open for writing"),
    (["exchange", "--rank", "0", "--store", "/tmp", "--result", "/nonexistent/dir/result"],
     "--result /nonexistent/dir/result: cannot open for writing"),
    (["frobnicate"], "A subcommand is required"),
    (["simulate", "--policy", "greedy"], '--policy: unknown policy "greedy"'),
]
# Issue 21: what cannot run here is refused before any rank starts.
info = json.loads(run(["info", "--json"]).stdout)
runnable = {c["kind"]: c["runnable"] for c in info["communicators"]}
if not runnable["nccl"]:
    bad_flags.append((["simulate", "--backend", "nccl"], "--backend nccl: cannot run here"))
    bad_flags.append((["exchange", "--backend", "nccl"], "--backend nccl: cannot run here"))
else:
    bad_flags.append((["simulate", "--backend", "nccl"], "--backend nccl with --async: communicator"))
if not info["devices"][1]["runnable"]:
    bad_flags.append((["simulate", "--device", "cuda", "--procs"], "--device cuda: no usable GPU here"))
    bad_flags.append((["exchange", "--device", "cuda", "--backend", "gloo"], "--device cuda: no usable GPU here"))
for args, message in bad_flags:
    started = time.monotonic()
    r = run(args, timeout=30)
    took = time.monotonic() - started
    lines = r.stderr.strip().splitlines()
    expect(r.returncode == 2, f"{args}: exit {r.returncode}, want 2 ({r.stderr[-300:]!r})")
    expect(len(lines) == 1 and message in lines[0], f"{args}: stderr {r.stderr[-300:]!r} lacks {message!r}")
    expect(took < 5, f"{args}: took {took:.1f} s")

if with_gloo:
    # Issue 15 F: a transfer fault in sync mode between processes; whatever the exit status, every
    # rank's error is in the merged report and the text output, and "verified" agrees with the ranks.
    fault = ["--procs", "--backend", "gloo", "--sync", "--timeout-ms", "2000", "--steps", "400",
             "--transfer-fault-rank", "3", "--transfer-fault-step", "150"]
    r = run(["simulate", "--json", *fault])
    out = json.loads(r.stdout) if r.stdout.startswith("{") else {}
    faults = [f for f in out.get("failures", []) if "injected transfer fault" in f.get("error", "")]
    expect(any(f.get("rank") == 3 for f in faults), f"transfer fault: rank 3's error not in failures: {out}")
    expect(len({f.get("rank") for f in faults}) == 4, f"transfer fault: every rank's error expected: {faults}")
    reports = out.get("rank_reports", [])
    if out.get("verified"):
        expect(all(not rep.get("failure") or rep.get("weights_intact") for rep in reports),
               f"transfer fault: verified although a rank is not: {reports}")
    if r.returncode != 0:
        expect(out.get("failure"), f"transfer fault: exit {r.returncode} without a failure in the report: {out}")
    r = run(["simulate", *fault])
    expect("injected transfer fault on rank 3" in r.stdout, f"transfer fault: text output lacks it: {r.stdout}")

r = run(["info"])
expect(r.returncode == 0 and "loopback" in r.stdout and "runnable" in r.stdout and "cuda runtime" in r.stdout,
       f"info: {r.stdout}")
# info --json names the versions of eplb and of what it runs on (empty with a reason when absent).
names = [c["name"] for c in info["components"]]
expect(names == ["eplb", "cuda driver", "cuda runtime", "nccl", "gloo"] and info["components"][0]["version"]
       == info["version"] and all(c["version"] or c["note"] for c in info["components"]), f"components: {info}")
if with_gloo:
    expect(info["components"][4]["version"].count(".") == 2, f"gloo version: {info['components']}")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("cli simulate: all checks passed")

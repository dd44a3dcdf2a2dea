"""Runs `eplb simulate --json` and returns its report with the checks every run must pass: a clean
exit, every committed layer verified, the same commit steps on every rank. Shared by the multiproc
stress and recovery tests."""
import json
import subprocess
import sys


def run_simulate(eplb, args, timeout):
    r = subprocess.run([eplb, "simulate", "--json", *args], capture_output=True, text=True, timeout=timeout)
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError:
        print(f"no JSON report (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
        sys.exit(1)
    failures = []
    if r.returncode != 0:
        failures.append(f"exit {r.returncode}: {out.get('failure')} {r.stderr[-2000:]}")
    if not out.get("verified"):
        failures.append("not every committed layer verified on every rank")
    if not out.get("commit_steps_consistent"):
        failures.append("ranks committed layers in different steps")
    return out, failures

"""The rank processes of an `eplb ... --procs` run: children of the parent whose command line has
--rank R. Shared by the process-fault tests, which signal one rank."""
import os


def rank_pids(parent):
    """{rank: pid} of the parent's children started with --rank."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"--rank" in args:
            out[int(args[args.index(b"--rank") + 1])] = int(entry)
    return out


def signal_rank(parent, pid, sig, timeout):
    """Sends `sig` to one rank and waits up to `timeout` s for the run to end: (stdout, stderr), or
    None when it hung (the parent is then killed). A stopped rank is killed afterwards either way,
    so that it never outlives the test."""
    import signal
    import subprocess

    os.kill(pid, sig)
    try:
        return parent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        parent.kill()
        return None
    finally:
        if sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

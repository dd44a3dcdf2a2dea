#!/usr/bin/env python3
"""Starts one process per rank of a communicator test and checks them all.

usage: run_ranks.py RANK_BINARY SIZE [--only R,...] [--store file|tcp] [--deadline S] -- ARGS...
Each rank gets --rank, --size and --store. Exit 0 when every started rank exits 0, 77 when every
rank skips (no GPUs), 1 otherwise; all output is printed. A rank still running at the deadline is
killed and counts as a hang (failure)."""
import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    argv = sys.argv[1:]
    sep = argv.index("--")
    head, rank_args = argv[:sep], argv[sep + 1:]
    binary, size = head[0], int(head[1])
    only, store, deadline = list(range(size)), "file", 120.0
    i = 2
    while i < len(head):
        if head[i] == "--only":
            only = [int(x) for x in head[i + 1].split(",")]
        elif head[i] == "--store":
            store = head[i + 1]
        elif head[i] == "--deadline":
            deadline = float(head[i + 1])
        i += 2
    tmp = tempfile.mkdtemp(prefix="eplb-ranks-")
    port = free_port()
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    procs = []
    for r in only:
        if store == "file":
            spec = f"file:{tmp}"
        else:
            spec = f"tcp-serve:{port}" if r == only[0] else f"tcp:{port}"
        cmd = [binary, "--rank", str(r), "--size", str(size), "--store", spec, *rank_args]
        procs.append((r, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)))
    end = time.monotonic() + deadline
    codes = {}
    for r, p in procs:
        try:
            out, _ = p.communicate(timeout=max(0.1, end - time.monotonic()))
            codes[r] = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            codes[r] = "hang"
        sys.stdout.write(f"--- rank {r} (exit {codes[r]})\n{out}")
    if all(c == 77 for c in codes.values()):
        return 77
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Ranks as threads (loopback) or as spawned processes (gloo on 127.0.0.1), every wait bounded; no
pytest needed (the gpu suite runs without it)."""

import multiprocessing as mp
import os
import threading
import traceback

import numpy as np


def pattern(src, dst, i, n):
    """Bytes that tell who sent what: a wrong peer, order or offset shows as a mismatch."""
    return ((np.arange(n, dtype=np.int64) * 7 + src * 1000 + dst * 100 + i) % 251).astype(np.uint8)


def run_threads(size, fn, timeout=60):
    """Runs fn(rank) on `size` threads; returns the results by rank, re-raises the first failure."""
    results = [None] * size
    errors = [None] * size

    def body(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[rank] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), f"a rank thread did not finish within {timeout} s"
    for e in errors:
        if e is not None:
            raise e
    return results


def _process_main(fn, rank, size, args, queue):
    try:
        queue.put((rank, True, fn(rank, size, *args)))
    except BaseException:  # noqa: BLE001 - sent to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_processes(size, fn, *args, timeout=120):
    """Runs fn(rank, size, *args) in `size` spawned processes; returns their results by rank."""
    # Spawned children import eplb and this directory's modules afresh.
    import eplb

    paths = [os.path.dirname(os.path.dirname(eplb.__file__)), os.path.dirname(os.path.abspath(__file__))]
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process_main, args=(fn, r, size, args, queue), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(size):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(size)]

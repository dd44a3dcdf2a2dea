#!/usr/bin/env python3
"""The Python package against the C++ communicator and against vLLM's torch_gloo way, in one run.

  exchange.py add_send [--n N]
      cost of one Communicator.add_send/add_recv call from Python (numpy array, torch tensor view)
      next to the C++ call (bench/cpp_exchange add_send), loopback ranks as threads; thread CPU time
      per call, so that a loaded host does not count.
  exchange.py exchange [--ranks R] [--device cpu|cuda] [--expert-bytes B] [--moved M] [--reps K]
                       [--transport auto|tcp|shared_memory]
      the expert exchange of bench/gpu/exchange_bench.cpp (each rank sends M experts of B bytes, two
      tensors each, spread over the other ranks, and receives as many) three ways, ranks as
      processes: eplb from Python (eplb.vllm.EplbCommunicator, views made per call as vLLM does),
      eplb from C++ (bench/cpp_exchange), and torch.distributed Gloo as vLLM's torch_gloo does it
      (CPU tensors as they are; CUDA tensors staged D2H -> batch_isend_irecv -> H2D). GB/s per rank
      (mean over ranks of the median of K repetitions); every received expert is checked.
Defaults: DeepSeek-V3 experts (44,040,192 bytes), 8 moved per rank on the CPU, 32 on CUDA.
Run from the repository root with PYTHONPATH=build/python (or an installed eplb)."""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPP = os.environ.get("EPLB_CPP_EXCHANGE", os.path.join(ROOT, "build", "bench", "cpp_exchange"))


def add_send_cost(n):
    import eplb

    out = []
    kinds = [("numpy", lambda a: a)]
    try:
        import torch

        kinds.append(("torch", torch.from_numpy))
    except ImportError:
        pass
    for kind, wrap in kinds:
        world = eplb.LoopbackWorld(2)
        comms = [eplb.Communicator("loopback", r, 2, world=world, timeout=60) for r in range(2)]
        base = [wrap(np.zeros((n, 16), dtype=np.uint8)) for _ in range(2)]
        ns = [0.0, 0.0]

        def rank(r):
            rows = base[r]
            # Thread CPU time: the cost of the calls themselves, not of sharing a loaded host.
            start = time.thread_time()
            for i in range(n):
                # A row view per call, as vLLM passes w[src_row].
                if r == 0:
                    comms[0].add_send(rows[i], 1)
                else:
                    comms[1].add_recv(rows[i], 0)
            ns[r] = (time.thread_time() - start) / n * 1e9
            comms[r].execute()

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.append({"bench": "add_send", "impl": f"python-{kind}", "ns_per_add_send": round(ns[0], 1),
                    "ns_per_add_recv": round(ns[1], 1)})
    if os.path.exists(CPP):
        line = subprocess.run([CPP, "add_send", str(n)], capture_output=True, text=True, check=True).stdout
        out.append(json.loads(line))
    return out


def _pairs(rank, size, moved):
    for i in range(moved):
        yield i, (rank + 1 + i % (size - 1)) % size, (rank - 1 - i % (size - 1) + size) % size


def _buffers(rank, a):
    import torch

    dev = "cuda" if a.device == "cuda" else "cpu"
    if dev == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    send = torch.full((a.moved, a.expert_bytes), rank + 1, dtype=torch.uint8, device=dev)
    recv = torch.zeros((a.moved, a.expert_bytes), dtype=torch.uint8, device=dev)
    return send, recv


def _check(recv, rank, size, moved):
    return all(int(recv[i, -1]) == frm + 1 and int(recv[i, 0]) == frm + 1 for i, _, frm in _pairs(rank, size, moved))


def python_rank(rank, a, rdv, queue):
    import eplb
    import eplb.vllm
    import torch

    send, recv = _buffers(rank, a)
    store = eplb.PrefixStore(eplb.FileStore(rdv), "py")
    comm = eplb.vllm.EplbCommunicator("gloo", rank=rank, size=a.ranks, store=store, device=a.device,
                                      gloo_transport=a.transport, timeout=120, staging_bytes=1 << 30)
    stream = torch.cuda.Stream() if a.device == "cuda" else None
    comm.set_stream(stream)
    w13 = a.expert_bytes // 3 * 2
    times = []
    for rep in range(a.reps + 1):
        store.barrier(f"rep-{rep}", a.ranks, timeout=120)
        start = time.perf_counter()
        for i, to, frm in _pairs(rank, a.ranks, a.moved):
            comm.add_send(send[i, :w13], to)
            comm.add_send(send[i, w13:], to)
            comm.add_recv(recv[i, :w13], frm)
            comm.add_recv(recv[i, w13:], frm)
        comm.execute()
        if stream is not None:
            stream.synchronize()
        if rep:
            times.append(time.perf_counter() - start)
    queue.put((rank, statistics.median(times), _check(recv, rank, a.ranks, a.moved)))
    comm.close()


def torch_rank(rank, a, rdv, queue):
    import torch
    import torch.distributed as dist

    send, recv = _buffers(rank, a)
    dist.init_process_group("gloo", init_method=f"file://{rdv}.torch", rank=rank, world_size=a.ranks)
    w13 = a.expert_bytes // 3 * 2
    cuda = a.device == "cuda"
    stream = torch.cuda.Stream() if cuda else None
    times = []
    for rep in range(a.reps + 1):
        dist.barrier()
        start = time.perf_counter()
        ops, back = [], []
        for i, to, frm in _pairs(rank, a.ranks, a.moved):
            for lo, hi in ((0, w13), (w13, a.expert_bytes)):
                if cuda:  # vLLM's torch_gloo: D2H into pinned memory, pageable receive buffers, H2D
                    with torch.cuda.stream(stream):
                        out = send[i, lo:hi].to("cpu", non_blocking=True)
                    buf = torch.empty(hi - lo, dtype=torch.uint8)
                    back.append((recv[i, lo:hi], buf))
                else:
                    out, buf = send[i, lo:hi], recv[i, lo:hi]
                ops.append(dist.P2POp(dist.isend, out, to))
                ops.append(dist.P2POp(dist.irecv, buf, frm))
        if cuda:
            stream.synchronize()
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        if cuda:
            with torch.cuda.stream(stream):
                for dst, buf in back:
                    dst.copy_(buf, non_blocking=True)
            stream.synchronize()
        if rep:
            times.append(time.perf_counter() - start)
    queue.put((rank, statistics.median(times), _check(recv, rank, a.ranks, a.moved)))
    dist.destroy_process_group()


def run_ranks(target, a):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=target, args=(r, a, os.path.join(d, "rdv"), queue)) for r in range(a.ranks)]
        for p in procs:
            p.start()
        got = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
    return got


def run_cpp(a):
    with tempfile.TemporaryDirectory() as d:
        procs = [subprocess.Popen([CPP, "exchange", str(r), str(a.ranks), d, a.device, str(a.expert_bytes),
                                   str(a.moved), str(a.reps), a.transport], stdout=subprocess.PIPE, text=True)
                 for r in range(a.ranks)]
        got = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            line = json.loads(out.strip().splitlines()[-1])
            got.append((line["rank"], line["seconds"], p.returncode == 0))
    return got


def exchange(a):
    impls = [("eplb-python", lambda: run_ranks(python_rank, a))]
    if os.path.exists(CPP):
        impls.append(("eplb-cpp", lambda: run_cpp(a)))
    impls.append(("torch-gloo", lambda: run_ranks(torch_rank, a)))
    out = []
    for name, run in impls:
        got = run()
        gbps = statistics.mean(a.expert_bytes * a.moved / s / 1e9 for _, s, _ in got)
        out.append({"bench": "exchange", "impl": name, "device": a.device, "transport": a.transport,
                    "ranks": a.ranks, "expert_bytes": a.expert_bytes, "moved": a.moved,
                    "median_seconds": [round(s, 4) for _, s, _ in sorted(got)], "gbps_per_rank": round(gbps, 3),
                    "verified": all(ok for _, _, ok in got)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["add_send", "exchange"])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--expert-bytes", type=int, default=44_040_192)
    p.add_argument("--moved", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--transport", default="tcp", choices=["auto", "tcp", "shared_memory"])
    a = p.parse_args()
    if a.moved is None:
        a.moved = 32 if a.device == "cuda" else 8
    for line in (add_send_cost(a.n) if a.mode == "add_send" else exchange(a)):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())

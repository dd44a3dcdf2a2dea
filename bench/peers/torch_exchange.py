#!/usr/bin/env python3
"""The PyTorch peer of bench/gpu/exchange_bench.cpp, done the way vLLM's EPLB communicators do it.

nccl: torch.distributed.batch_isend_irecv of P2POps on an NCCL group (vLLM's torch_nccl).
gloo: D2H into pinned memory on the stream, stream sync, gloo isend/irecv of CPU tensors (pageable
receive buffers), wait, H2D (vLLM's torch_gloo, the communicator it forces for async EPLB).
Each rank sends `moved` experts (two tensors each) to the other ranks and receives as many; prints
one JSON line per rank with the median seconds. usage: torch_exchange.py RANKS EXPERT_BYTES MOVED REPS LABEL
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, size, expert_bytes, moved, reps, label, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    # Fewer GPUs than ranks (EPLB_SHARE_GPUS runs): ranks share them and only the Gloo path runs
    # (NCCL refuses two ranks on one GPU).
    shared = torch.cuda.device_count() < size
    torch.cuda.set_device(rank % torch.cuda.device_count())
    if shared:
        dist.init_process_group("gloo", rank=rank, world_size=size)
    else:
        dist.init_process_group("nccl", rank=rank, world_size=size, device_id=torch.device("cuda", rank))
    gloo = dist.new_group(backend="gloo")
    w13 = expert_bytes // 3 * 2
    w2 = expert_bytes - w13
    send = torch.full((moved, expert_bytes), rank + 1, dtype=torch.uint8, device="cuda")
    recv = torch.zeros((moved, expert_bytes), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()

    def pairs():
        for i in range(moved):
            to = (rank + 1 + i % (size - 1)) % size
            frm = (rank - 1 - i % (size - 1) + size) % size
            yield i, to, frm

    def nccl_once():
        ops = []
        for i, to, frm in pairs():
            for a, b in ((0, w13), (w13, expert_bytes)):
                ops.append(dist.P2POp(dist.isend, send[i, a:b], to))
                ops.append(dist.P2POp(dist.irecv, recv[i, a:b], frm))
        for r in dist.batch_isend_irecv(ops):
            r.wait()
        torch.cuda.synchronize()

    def gloo_once():
        ops, back = [], []
        with torch.cuda.stream(stream):
            for i, to, frm in pairs():
                for a, b in ((0, w13), (w13, expert_bytes)):
                    cpu = send[i, a:b].to("cpu", non_blocking=True)
                    ops.append(dist.P2POp(dist.isend, cpu, to, group=gloo))
                    buf = torch.empty(b - a, dtype=torch.uint8)
                    ops.append(dist.P2POp(dist.irecv, buf, frm, group=gloo))
                    back.append((recv[i, a:b], buf))
        stream.synchronize()
        for r in dist.batch_isend_irecv(ops):
            r.wait()
        with torch.cuda.stream(stream):
            for dst, buf in back:
                dst.copy_(buf, non_blocking=True)
        stream.synchronize()

    runs = (("torch_nccl", nccl_once, reps), ("torch_gloo", gloo_once, max(3, reps // 3)))
    for name, once, n in runs[1:] if shared else runs:
        times = []
        for rep in range(n + 1):
            dist.barrier(group=gloo)
            start = time.perf_counter()
            once()
            if rep:
                times.append(time.perf_counter() - start)
        times.sort()
        med = times[len(times) // 2]
        ok = all(int(recv[i, -1]) == frm + 1 for i, _, frm in pairs())
        print(json.dumps({"bench": "exchange", "impl": "torch", "backend": name, "label": label, "ranks": size,
                          "rank": rank, "expert_bytes": expert_bytes, "moved": moved, "seconds": round(med, 6),
                          "gbps": round(expert_bytes * moved / med / 1e9, 2), "verified": ok}), flush=True)
        recv.zero_()
    dist.destroy_process_group()


if __name__ == "__main__":
    size, expert_bytes, moved, reps, label = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    port = 29500 + os.getpid() % 1000
    mp.spawn(worker, args=(size, expert_bytes, moved, reps, label, port), nprocs=size, join=True)

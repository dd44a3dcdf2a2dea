#!/usr/bin/env python3
"""The PyTorch peer of bench/gpu/rearrange_bench.cpp: vLLM's synchronous rearrangement written with
torch.distributed the way vLLM does it (per layer: local copies into a one-layer buffer, one
batch_isend_irecv of per-tensor P2P ops with the same sender rule, wait, buffer -> weights,
duplicates), on the same maps (read from MAPS_JSON).

usage: torch_rearrange.py RANKS EXPERT_BYTES MAPS_JSON REPS LABEL"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def plan(old, new, ranks, rank, slots):
    lo, hi = rank * slots, (rank + 1) * slots
    old_local, new_local = old[lo:hi], new[lo:hi]
    unchanged = [o == n for o, n in zip(old_local, new_local)]
    local = [not unchanged[i] and new_local[i] != -1 and new_local[i] in old_local for i in range(slots)]
    primary, dups = {}, []
    for i in range(slots):
        e = new_local[i]
        if unchanged[i] or local[i] or e == -1:
            continue
        if e in primary:
            dups.append((i, primary[e]))
        else:
            primary[e] = i
    holders = lambda row, e: sorted({p // slots for p, x in enumerate(row) if x == e})
    sends, recvs = [], []
    for e in sorted(set(x for x in old + new if x >= 0)):
        S = holders(old, e)
        R = [r for r in holders(new, e) if r not in S]
        if not R:
            continue
        n = len(R) // len(S)
        if rank in S:
            i = S.index(rank)
            mine = R[i * n:(i + 1) * n] + ([R[len(S) * n + i]] if len(S) * n + i < len(R) else [])
            src = old_local.index(e)
            sends += [(e, d, src) for d in mine]
        if rank in R:
            j = R.index(rank)
            frm = S[j // n] if j < len(S) * n else S[j - len(S) * n]
            recvs.append((e, frm, primary[e]))
    return unchanged, local, primary, dups, sends, recvs, old_local


def worker(rank, ranks, expert_bytes, maps, reps, label, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=ranks, device_id=torch.device("cuda", rank))
    old_all, new_all = maps["old"], maps["new"]
    layers, slots = len(old_all), len(old_all[0]) // ranks
    w13 = expert_bytes // 3 * 2
    weights = [[torch.full((slots, w13), l + 1, dtype=torch.uint8, device="cuda"),
                torch.full((slots, expert_bytes - w13), l + 1, dtype=torch.uint8, device="cuda")] for l in range(layers)]
    buffers = [torch.empty_like(w) for w in weights[0]]
    plans = [[plan(a[l], b[l], ranks, rank, slots) for l in range(layers)] for a, b in ((old_all, new_all), (new_all, old_all))]
    times, moved = [], 0
    for rep in range(reps + 1):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        rep_bytes = 0
        for l in range(layers):
            unchanged, local, primary, dups, sends, recvs, old_local = plans[rep % 2][l]
            # Local moves through the buffer (vLLM's move_to_buffer), P2P, then move_from_buffer.
            new_local = (new_all if rep % 2 == 0 else old_all)[l][rank * slots:(rank + 1) * slots]
            for i in range(slots):
                if local[i]:
                    s = old_local.index(new_local[i])
                    for w, b in zip(weights[l], buffers):
                        b[i].copy_(w[s], non_blocking=True)
            ops = []
            for e, dst, src in sends:
                for w in weights[l]:
                    ops.append(dist.P2POp(dist.isend, w[src], dst))
            for e, frm, row in recvs:
                for b in buffers:
                    ops.append(dist.P2POp(dist.irecv, b[row], frm))
                rep_bytes += expert_bytes
            if ops:
                for r in dist.batch_isend_irecv(ops):
                    r.wait()
            for i in range(slots):
                if not unchanged[i] and (local[i] or i in primary.values()):
                    for w, b in zip(weights[l], buffers):
                        w[i].copy_(b[i], non_blocking=True)
            for d, p in dups:
                for w in weights[l]:
                    w[d].copy_(w[p], non_blocking=True)
        torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - start)
            moved = rep_bytes
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({"bench": "rearrange", "impl": "torch", "backend": "torch_nccl", "label": label, "ranks": ranks,
                      "rank": rank, "layers": layers, "bytes_received": moved, "seconds": round(med, 4),
                      "ms_per_layer": round(med * 1000 / layers, 3), "gbps": round(moved / med / 1e9, 2)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    ranks, expert_bytes, maps_path, reps, label = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    maps = json.load(open(maps_path))
    mp.spawn(worker, args=(ranks, expert_bytes, maps, reps, label, 29700 + os.getpid() % 200), nprocs=ranks, join=True)

#!/usr/bin/env python3
"""eplb from Python in one file: a placement, an exchange and a serving loop with EPLB, two EP ranks
as threads (processes or GPUs in an engine: use backend "gloo" and a FileStore/TCPStore or the
engine's torch.distributed store). Run: PYTHONPATH=build/python python3 examples/python/quickstart.py"""

import threading

import numpy as np

import eplb

# 1. A placement: vLLM's rebalance_experts contract (torch tensors in give torch tensors out).
load = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]], dtype=np.float32)
phy2log, log2phy, counts = eplb.rebalance(load, num_replicas=16, num_groups=4, num_nodes=2, num_ranks=8)
print("phy2log", phy2log[0].tolist())

# 2. An exchange: each rank sends a tensor to the other, in place, no copies through Python.
world = eplb.LoopbackWorld(2)
got = [None, None]


def exchange(rank):
    with eplb.Communicator("loopback", rank, 2, world=world, timeout=10) as comm:
        send = np.full(1 << 20, rank + 1, dtype=np.uint8)
        recv = np.zeros(1 << 20, dtype=np.uint8)
        comm.add_send(send, 1 - rank)
        comm.add_recv(recv, 1 - rank)
        comm.execute()  # the GIL is released while the bytes move
        got[rank] = int(recv[0])


threads = [threading.Thread(target=exchange, args=(r,)) for r in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print("received from the other rank:", got)
assert got == [2, 1]

# 3. A serving loop: State rearranges this rank's expert weights in place when the load shifts.
store = eplb.MemoryStore()
world = eplb.LoopbackWorld(2)
experts, slots = 6, 4  # 8 physical slots over 2 ranks: 2 redundant
summary = [None, None]


def serve(rank):
    # One MoE layer with two tensors per expert, this rank's 4 slots; slot s holds expert s % 6.
    w13 = np.stack([np.full(64, (rank * slots + s) % experts, dtype=np.uint8) for s in range(slots)])
    w2 = np.stack([np.full(32, (rank * slots + s) % experts, dtype=np.float32) for s in range(slots)])
    config = {"communicator": "loopback", "window_size": 10, "step_interval": 20}
    with eplb.State(config, [[w13, w2]], num_experts=experts, rank=rank, num_ranks=2, store=store,
                    world=world) as state:
        for step in range(60):
            state.load_buffer[0, :] += 1  # the router's counts; expert 2's only slot is hot
            state.load_buffer[0, 2] += 100
            state.step()
        state.synchronize()
        phy2log = np.asarray(state.phy2log)[0]
        mine = phy2log[rank * slots:(rank + 1) * slots]
        assert [int(w13[s][0]) for s in range(slots)] == mine.tolist()  # weights follow the map
        summary[rank] = (phy2log.tolist(), state.metrics["rebalances"])


threads = [threading.Thread(target=serve, args=(r,)) for r in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print("maps after the load shift:", summary[0][0], "rebalances:", summary[0][1])
assert summary[0][0] == summary[1][0] and summary[0][0].count(2) > 1

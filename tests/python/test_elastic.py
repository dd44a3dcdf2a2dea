"""Elastic EP from Python (issue 20): ranks as threads over loopback worlds, numpy weights.

- rescale(): 4 ranks -> 3 (rank 1 leaves) -> 4 (a rank joins with empty slots), sync and async;
  after each change every rank's slots hold the bytes its maps name and the maps agree.
- recover(): rank 2 goes silent; the survivors agree, and the experts only it held come back through
  a Python reload_expert hook, or are masked while it raises (no replica, replica_count 0) until
  restore_masked() loads them once the checkpoint is back."""

import threading
import time

import numpy as np
import pytest

import eplb
from conftest import run_threads

LAYERS, EXPERTS = 3, 6


def expert_bytes(layer, expert, n, dtype):
    return (np.arange(n) * 3 + layer * 50 + expert * 7 + 1).astype(dtype)


def make_weights(rank, slots, empty=False):
    layers = []
    for layer in range(LAYERS):
        w13 = np.zeros((slots, 40), dtype=np.uint8)
        w2 = np.zeros((slots, 3, 5), dtype=np.float32)
        for s in range(slots):
            if not empty:
                load_expert([w13, w2], layer, (rank * slots + s) % EXPERTS, s)
        layers.append([w13, w2])
    return layers


def load_expert(tensors, layer, expert, slot):
    tensors[0][slot] = expert_bytes(layer, expert, 40, np.uint8)
    tensors[1][slot] = expert_bytes(layer, expert, 15, np.float32).reshape(3, 5)


def check_weights(state, weights, slots):
    maps = state.maps()
    rank = state.rank
    for layer, (w13, w2) in enumerate(weights):
        for s in range(slots):
            expert = int(maps[layer][rank * slots + s])
            if expert < 0:
                continue
            assert np.array_equal(w13[s], expert_bytes(layer, expert, 40, np.uint8)), (rank, layer, s, expert)
            assert np.array_equal(w2[s].ravel(), expert_bytes(layer, expert, 15, np.float32)), (rank, layer, s)


def serve(state, steps, use_async):
    slots = state.num_ranks * 4
    for step in steps:
        for layer in range(LAYERS):
            counts = np.ones(slots, dtype=np.int64)
            counts[(step // 9 + layer) % slots] += 40
            state.record_load(layer, counts)
        state.step()
        if use_async:
            time.sleep(0.002)


def finish(state, use_async):
    state.drain()
    for _ in range(2000):
        if not state.metrics["rebalance_in_flight"]:
            break
        serve(state, [0], use_async)
    state.synchronize()


@pytest.mark.parametrize("use_async", [False, True])
def test_rescale_leave_then_join(use_async):
    store = eplb.MemoryStore()
    worlds = {"4": eplb.LoopbackWorld(4), "3": eplb.LoopbackWorld(3), "4b": eplb.LoopbackWorld(4)}
    config = {"communicator": "loopback", "window_size": 8, "step_interval": 10, "use_async": use_async,
              "timeout_ms": 10000}
    joining = threading.Event()

    def original(rank):
        weights = make_weights(rank, 4)
        state = eplb.State(config, weights, num_experts=EXPERTS, rank=rank, num_ranks=4, store=store,
                           world=worlds["4"])
        serve(state, range(1, 31), use_async)
        left = state.rescale(3, [0, -1, 1, 2], world=worlds["3"])
        assert left["left"] == (rank == 1) and left["epoch"] == 1 and left["num_ranks"] == 3
        if left["left"]:
            state.stop()
            return None
        assert state.rank == left["rank"] and state.num_ranks == 3
        assert state.load_buffer.shape == (LAYERS, 12)
        check_weights(state, weights, 4)
        serve(state, range(31, 61), use_async)
        assert state.metrics["rank_set_epoch"] == 1
        if state.rank == 0:
            joining.set()  # the joining rank may now wait for the handoff (epoch 2)
        joined = state.rescale(4, [0, 1, 2], world=worlds["4b"])
        assert joined["epoch"] == 2 and joined["num_ranks"] == 4 and joined["fill_error"] == ""
        return serve_last(state, weights)

    def serve_last(state, weights):
        # Steps 61..90 on the set of 4, drained; every slot checked; the maps and rank returned.
        check_weights(state, weights, 4)
        serve(state, range(61, 91), use_async)
        finish(state, use_async)
        check_weights(state, weights, 4)
        out = state.maps().tolist(), state.rank
        state.stop()
        return out

    def joiner():
        assert joining.wait(60)
        weights = make_weights(3, 4, empty=True)
        state = eplb.State(config, weights, num_experts=EXPERTS, rank=3, num_ranks=4, store=store,
                           world=worlds["4b"], join_epoch=2)
        return serve_last(state, weights)

    results = run_threads(5, lambda w: original(w) if w < 4 else joiner(), timeout=120)
    finals = [r for r in results if r is not None]
    assert sorted(rank for _, rank in finals) == [0, 1, 2, 3]
    assert all(maps == finals[0][0] for maps, _ in finals)
    assert all(len(row) == 16 for row in finals[0][0])


@pytest.mark.parametrize("checkpoint", ["reachable", "unreachable then back"])
def test_recover_after_a_silent_rank(checkpoint):
    # Two slots a rank, vLLM's start (slot p holds expert p % 6): rank 2's slots 4 and 5 hold the
    # only replicas of experts 4 and 5. It goes silent before the first rebalance (step 10).
    store = eplb.MemoryStore()
    world = eplb.LoopbackWorld(4)
    survivors_worlds = {}
    lock = threading.Lock()
    through = threading.Semaphore(0)  # one release per survivor that is through
    config = {"communicator": "loopback", "window_size": 4, "step_interval": 40, "timeout_ms": 1000}
    lost = [(layer, e) for layer in range(LAYERS) for e in (4, 5)]
    reachable = threading.Event()
    if checkpoint == "reachable":
        reachable.set()

    def world_of(size):
        with lock:
            return survivors_worlds.setdefault(size, eplb.LoopbackWorld(size))

    def survivor(state, weights):
        for step in range(1, 40):
            for layer in range(LAYERS):
                state.record_load(layer, np.ones(8, dtype=np.int64))
            try:
                state.step()
            except eplb.Error:
                break
        report = state.recover(world_factory=world_of)
        assert report["lost_ranks"] == [2] and report["num_ranks"] == 3
        if checkpoint == "reachable":
            assert report["experts_reloaded"] == len(lost) and report["masked"] == []
        else:
            # The hook raised: served on without them, no replica, no token routed to them.
            assert report["experts_reloaded"] == 0 and report["masked"] == lost
            assert state.masked_experts() == lost and state.metrics["masked_experts"] == len(lost)
            counts = np.asarray(state.replica_count)
            assert all(counts[layer][e] == 0 for layer, e in lost)
            assert all(e not in row for row in state.maps().tolist() for e in (4, 5))
            check_weights(state, weights, 2)
            # The checkpoint is back: every survivor (sync: no rebalance in flight) loads them again.
            reachable.set()
            restored = state.restore_masked()
            assert restored["experts_reloaded"] == len(lost) and restored["masked"] == []
            assert state.masked_experts() == [] and state.metrics["masked_experts"] == 0
            assert all(e in row for row in state.maps().tolist() for e in (4, 5))
        check_weights(state, weights, 2)
        return state.maps().tolist()

    def rank_main(rank):
        weights = make_weights(rank, 2)

        def reload_expert(layer, expert, slot):
            if not reachable.is_set():
                raise OSError("checkpoint unreachable")
            load_expert(weights[layer], layer, expert, slot)

        state = eplb.State(config, weights, num_experts=EXPERTS, rank=rank, num_ranks=4, store=store,
                           world=world, reload_expert=reload_expert)
        try:
            if rank != 2:
                return survivor(state, weights)
            serve_plain(state, range(1, 5))
            for _ in range(3):  # silent until the survivors are through
                assert through.acquire(timeout=60)
            return None
        finally:
            if rank != 2:
                through.release()
            state.stop()

    results = run_threads(4, rank_main, timeout=120)
    survivors = [r for r in results if r is not None]
    assert len(survivors) == 3
    assert all(maps == survivors[0] for maps in survivors)


def serve_plain(state, steps):
    for _ in steps:
        for layer in range(LAYERS):
            state.record_load(layer, np.ones(8, dtype=np.int64))
        state.step()

"""State from Python: two EP ranks as threads rearrange their numpy/torch weights in place; every
slot's bytes must then be those of the expert the new map puts there, on both ranks."""

import time

import numpy as np
import pytest

import eplb
from conftest import HAVE_TORCH, run_threads

LAYERS, EXPERTS, RANKS, SLOTS = 3, 6, 2, 4  # 8 physical slots: 2 redundant


def expert_bytes(layer, expert, n, dtype):
    return (np.arange(n) * 3 + layer * 50 + expert * 7 + 1).astype(dtype)


def make_weights(rank, kind):
    layers = []
    for layer in range(LAYERS):
        w13 = np.zeros((SLOTS, 40), dtype=np.uint8)
        w2 = np.zeros((SLOTS, 3, 5), dtype=np.float32)
        for s in range(SLOTS):
            expert = (rank * SLOTS + s) % EXPERTS  # vLLM's initial placement
            w13[s] = expert_bytes(layer, expert, 40, np.uint8)
            w2[s] = expert_bytes(layer, expert, 15, np.float32).reshape(3, 5)
        if kind == "torch":
            import torch

            w13, w2 = torch.from_numpy(w13), torch.from_numpy(w2)
        layers.append([w13, w2])
    return layers


def check_weights(rank, weights, phy2log):
    for layer, (w13, w2) in enumerate(weights):
        for s in range(SLOTS):
            expert = int(phy2log[layer][rank * SLOTS + s])
            assert np.array_equal(np.asarray(w13[s]), expert_bytes(layer, expert, 40, np.uint8)), (layer, s)
            assert np.array_equal(np.asarray(w2[s]).ravel(), expert_bytes(layer, expert, 15, np.float32))


CASES = [(kind, use_async, "memory") for kind in ["numpy"] + (["torch"] if HAVE_TORCH else [])
         for use_async in (False, True)]
# A Python store (the torch.distributed adapter's path): the load sum and the commit agreement call
# it from eplb's own threads, which take the GIL only inside each call.
CASES += [("numpy", False, "python"), ("numpy", True, "python")]
# The engine's own buffers (vLLM's layers: an int32 load counter, int64 maps).
CASES += [("numpy", False, "engine"), ("numpy", True, "engine")]


def engine_buffers():
    slots = RANKS * SLOTS
    return {"load": np.zeros((LAYERS, slots), dtype=np.int32),
            "phy2log": np.full((LAYERS, slots), 99, dtype=np.int64),
            "log2phy": np.full((LAYERS, EXPERTS, slots - EXPERTS + 1), 99, dtype=np.int64),
            "replica_count": np.full((LAYERS, EXPERTS), 99, dtype=np.int64)}


@pytest.mark.parametrize("kind,use_async,store_kind", CASES)
def test_two_ranks_rebalance_in_place(kind, use_async, store_kind):
    from test_stores import DictStore

    world = eplb.LoopbackWorld(RANKS)
    store = eplb.TorchStore(DictStore()) if store_kind == "python" else eplb.MemoryStore()
    # Async mode stages on a background thread and commits steps later: a longer interval lets the
    # first rebalance end before the next starts.
    config = {"communicator": "loopback", "window_size": 8, "step_interval": 40 if use_async else 8,
              "use_async": use_async, "commit_lag_steps": 2, "timeout_ms": 20000}

    def rank_main(rank):
        weights = make_weights(rank, kind)
        given = engine_buffers() if store_kind == "engine" else None
        with eplb.State(config, weights, num_experts=EXPERTS, rank=rank, num_ranks=RANKS, store=store,
                        world=world, buffers=given) as state:
            assert state.communicator == "loopback"
            before = np.asarray(state.phy2log).copy()
            assert before.tolist() == [[p % EXPERTS for p in range(RANKS * SLOTS)]] * LAYERS
            load = state.load_buffer
            want = "int32" if given else "int64"
            assert tuple(load.shape) == (LAYERS, RANKS * SLOTS) and str(load.dtype).endswith(want)
            if given:  # the engine's own arrays, written at construction
                assert load is given["load"] and state.phy2log is given["phy2log"]
                assert given["phy2log"].tolist() == before.tolist()
            finished = False
            for step in range(2000):
                # Expert 2 (one replica, on rank 0) is hot: its slots get most tokens (through the load buffer on layer 0,
                # record_load on the others).
                hot = [p for p in range(RANKS * SLOTS) if p % EXPERTS == 2]
                load[0, :] += 1
                load[0, hot[0]] += 50
                for layer in range(1, LAYERS):
                    counts = np.ones(RANKS * SLOTS, dtype=np.int64)
                    counts[hot] += 40
                    state.record_load(layer, counts)
                report = state.step()
                # The first rebalance (a quarter interval in) may see too little load to move anything.
                finished = finished or (report["rebalance_finished"] and not report["rebalance_skipped"])
                if finished and not state.metrics["rebalance_in_flight"]:
                    break
                if use_async:
                    time.sleep(0.002)  # a forward step's worth of time for the background thread
            assert finished, f"no rebalance finished within {step + 1} steps"
            # Drain (every rank sees the end of a rebalance in the same step): maps and weights agree.
            state.drain()
            for _ in range(2000):
                if not state.metrics["rebalance_in_flight"]:
                    break
                state.step()
            state.synchronize()
            after = np.asarray(state.phy2log).copy()
            assert after.tolist() == state.maps().tolist()
            counts = np.asarray(state.replica_count)
            assert after.tolist() != before.tolist()
            # Initially experts 0 and 1 have the redundant slots; the hot one takes both.
            assert [int(c[2]) for c in counts] == [3] * LAYERS, counts
            log2phy = np.asarray(state.log2phy)
            for layer in range(LAYERS):
                for e in range(EXPERTS):
                    slots = [int(p) for p in log2phy[layer][e] if p >= 0]
                    assert slots == [p for p in range(RANKS * SLOTS) if after[layer][p] == e]
            check_weights(rank, weights, after)
            if given:
                assert given["phy2log"].tolist() == after.tolist() and given["log2phy"].dtype == np.int64
            m = state.metrics
            assert m["rebalances"] >= 1
            # The records (issue 21): one per rebalance that ended, ids from 1, bytes as the metrics.
            history = state.history()
            assert [h["id"] for h in history] == list(range(1, len(history) + 1))
            assert {h["outcome"] for h in history} <= {"committed", "skipped"}
            assert sum(h["bytes_received"] for h in history) == m["bytes_moved"]
            text = state.prometheus_text("vllm:eplb")
            assert f'vllm:eplb_rebalances_started_total{{rank="{rank}"}} {m["rebalances"]}' in text
            assert "# TYPE vllm:eplb_step_overhead_seconds histogram" in text
            return after.tolist(), m["bytes_moved"]

    results = run_threads(RANKS, rank_main, timeout=120)
    assert results[0][0] == results[1][0]
    assert results[0][1] + results[1][1] > 0


def test_bad_weights_are_named():
    store = eplb.MemoryStore()
    world = eplb.LoopbackWorld(1)
    config = {"communicator": "loopback"}
    w = [[np.zeros((4, 8), dtype=np.uint8)], [np.zeros((3, 8), dtype=np.uint8)]]
    with pytest.raises(eplb.InvalidArgument, match=r"weights\[1\]\[0\]: the first dimension must be the 4 local slots"):
        eplb.State(config, w, num_experts=4, rank=0, num_ranks=1, store=store, world=world)
    ro = np.zeros((4, 8), dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(eplb.InvalidArgument, match=r"weights\[0\]\[0\]: is read-only"):
        eplb.State(config, [[ro]], num_experts=4, rank=0, num_ranks=1, store=store, world=world)
    with pytest.raises(eplb.InvalidArgument, match="window_size"):
        eplb.State({"window_size": 0, "communicator": "loopback"}, [[np.zeros((4, 8), dtype=np.uint8)]],
                   num_experts=4, rank=0, num_ranks=1, store=store, world=world)
    one = [[np.zeros((4, 8), dtype=np.uint8)]]
    ro_load = np.zeros((1, 4), dtype=np.int64)
    ro_load.flags.writeable = False
    for buffers, message in [
            ({"loads": np.zeros((1, 4), dtype=np.int64)}, "buffers: unknown key 'loads'"),
            ({"load": np.zeros((1, 4), dtype=np.float32)}, r"buffers.load: dtype float32 \(int32 or int64 wanted\)"),
            ({"load": np.zeros((4,), dtype=np.int64)}, r"buffers.load: shape \[4\], wanted \[1, 4\]"),
            ({"log2phy": np.zeros((1, 4, 2), dtype=np.int64)}, r"buffers.log2phy: shape \[1, 4, 2\], wanted \[1, 4, 1\]"),
            ({"load": ro_load}, "buffers.load: is read-only")]:
        with pytest.raises(eplb.InvalidArgument, match=message):
            eplb.State(config, one, num_experts=4, rank=0, num_ranks=1, store=store, world=world, buffers=buffers)
    s = eplb.State(config, one, num_experts=4, rank=0, num_ranks=1, store=store, world=world)
    with pytest.raises(eplb.InvalidArgument, match="counts: dtype int32 is not int64"):
        s.record_load(0, np.zeros(4, dtype=np.int32))
    s.stop()
    s.stop()  # idempotent
    with pytest.raises(eplb.InvalidArgument, match="state: already stopped"):
        s.step()

"""eplb.vllm: the communicator under a vLLM-shaped rearrangement (both interface versions), byte for
byte against the expected weights and against the same rearrangement over torch.distributed Gloo
(vLLM's torch_gloo path: P2POps and batch_isend_irecv); the policy classes; imports without vLLM."""

import subprocess
import sys

import numpy as np
import pytest

import eplb
import eplb.vllm
import vllm_shaped
from conftest import HAVE_TORCH, needs_torch, run_processes, run_threads


def test_imports_without_vllm():
    code = "import sys; sys.modules['vllm'] = None; import eplb.vllm; print(eplb.vllm.EplbCommunicator.__mro__[1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "object" in out.stdout


@pytest.mark.parametrize("interface", ["pr33176", "list", "context", "batched"])
@pytest.mark.parametrize("seed", [0, 1])
def test_rearrangement_over_loopback_threads(interface, seed):
    ranks = 4
    old, new = vllm_shaped.maps(ranks=ranks, seed=seed)
    assert (old != new).sum() > 20  # a real reshuffle, across ranks
    world = eplb.LoopbackWorld(ranks)

    def rank_main(rank):
        comm = eplb.vllm.EplbCommunicator("loopback", rank=rank, size=ranks, world=world, timeout=20)
        assert comm.needs_profile_buffer_reservation is False
        comm.set_stream(None)
        weights = vllm_shaped.make_weights(old, rank, ranks)
        vllm_shaped.rearrange(old, new, weights, rank, ranks, comm, interface)
        vllm_shaped.check_weights(new, weights, rank, ranks)
        return True

    assert run_threads(ranks, rank_main) == [True] * ranks


class TorchGlooCommunicator:
    """The reference: vLLM's torch communicator shape (P2POps on a gloo group, batch_isend_irecv)."""

    def __init__(self):
        self.ops = []

    def add_send(self, tensor, dst_rank):
        import torch.distributed as dist

        self.ops.append(dist.P2POp(dist.isend, tensor, dst_rank))

    def add_recv(self, tensor, src_rank):
        import torch.distributed as dist

        self.ops.append(dist.P2POp(dist.irecv, tensor, src_rank))

    def execute(self):
        import torch.distributed as dist

        try:
            if self.ops:
                for req in dist.batch_isend_irecv(self.ops):
                    req.wait()
        finally:
            self.ops.clear()


def compare_rank(rank, size, rdv):
    import torch
    import torch.distributed as dist

    import eplb
    import eplb.vllm
    import vllm_shaped

    old, new = vllm_shaped.maps(ranks=size, seed=3)
    results = []
    dist.init_process_group("gloo", init_method=f"file://{rdv}.torch", rank=rank, world_size=size)
    try:
        store = eplb.PrefixStore(eplb.as_store(dist.distributed_c10d._get_default_store()), "eplb")
        ours = eplb.vllm.EplbCommunicator("gloo", rank=rank, size=size, store=store, timeout=30, gloo_transport="tcp")
        for comm, interface in ((TorchGlooCommunicator(), "pr33176"), (ours, "pr33176"), (ours, "list"),
                                (ours, "batched")):
            weights = [[torch.from_numpy(w) for w in layer] for layer in vllm_shaped.make_weights(old, rank, size)]
            vllm_shaped.rearrange(old, new, weights, rank, size, comm, interface)
            vllm_shaped.check_weights(new, weights, rank, size)
            results.append(b"".join(t.numpy().tobytes() for layer in weights for t in layer))
    finally:
        dist.destroy_process_group()
    return results


@needs_torch
def test_same_bytes_as_torch_distributed_gloo(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed without gloo")
    results = run_processes(3, compare_rank, str(tmp_path / "rdv"))
    for torch_bytes, *eplb_bytes in results:
        assert eplb_bytes == [torch_bytes] * 3


def test_policy_classes_are_rebalance():
    rng = np.random.default_rng(5)
    load = rng.integers(0, 100, size=(2, 16)).astype(np.float32)
    got = eplb.vllm.EplbDefaultPolicy.rebalance_experts(load, 24, 4, 2, 4)
    want = eplb.rebalance(load, 24, 4, 2, 4)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    old = want[0]
    got = eplb.vllm.EplbMinMovePolicy.rebalance_experts(load[::-1].copy(), 24, 4, 2, 4, old_global_expert_indices=old)
    assert np.array_equal(got[0], eplb.rebalance(load[::-1].copy(), 24, 4, 2, 4, old=old, policy="min_move")[0])


def test_no_store_without_torch_distributed():
    with pytest.raises(ValueError, match="store: none given"):
        eplb.vllm.EplbCommunicator("gloo", rank=0, size=2)


def test_install_patches_vllms_factory(monkeypatch):
    import types

    names = ["vllm", "vllm.distributed", "vllm.distributed.eplb", "vllm.distributed.eplb.eplb_communicator",
             "vllm.distributed.eplb.eplb_state"]
    fakes = {n: types.ModuleType(n) for n in names}
    for leaf in names[3:]:
        fakes[leaf].create_eplb_communicator = lambda *a, **k: "vllm's own"
    for n, m in fakes.items():
        monkeypatch.setitem(sys.modules, n, m)
    monkeypatch.setitem(sys.modules, "vllm.distributed.elastic_ep", None)
    assert eplb.vllm.install() == names[3:]
    for leaf in names[3:]:
        assert fakes[leaf].create_eplb_communicator is eplb.vllm.create_eplb_communicator


def test_install_without_vllm_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="create_eplb_communicator was not found"):
        eplb.vllm.install()


class Group:
    """What the factory reads of vLLM's GroupCoordinator."""

    def __init__(self, rank, size):
        self.rank_in_group, self.world_size, self.device, self.unique_name = rank, size, "cpu", "ep:0"


def factory_rank(rank, size, rdv):
    import eplb
    import eplb.vllm
    import vllm_shaped

    old, new = vllm_shaped.maps(ranks=size, seed=4)
    for _ in range(2):  # made twice for the group, as after a failed rebalance: fresh keys each time
        weights = vllm_shaped.make_weights(old, rank, size)
        comm = eplb.vllm.create_eplb_communicator(Group(rank, size), "torch_gloo", weights[0],
                                                  store=eplb.FileStore(rdv), timeout=20)
        assert comm.backend == "gloo"
        vllm_shaped.rearrange(old, new, weights, rank, size, comm)
        vllm_shaped.check_weights(new, weights, rank, size)
        comm.close()
    return sorted(eplb.vllm._generations.items())


def test_factory_on_a_group_coordinator(tmp_path):
    """vLLM's factory call (group, vLLM backend name, weights), one process per rank as in vLLM."""
    assert run_processes(2, factory_rank, str(tmp_path / "rdv")) == [[("ep:0", 2)]] * 2
    with pytest.raises(eplb.InvalidArgument, match="unknown"):
        eplb.vllm.create_eplb_communicator(Group(0, 1), "carrier_pigeon", store=eplb.MemoryStore())


def test_migration_batches_pair_each_rank_with_one_peer():
    """The "batched" interface above really cuts layers into several rank-pair-disjoint batches."""
    old, new = vllm_shaped.maps(ranks=4, seed=0)
    for layer in range(old.shape[0]):
        batches = vllm_shaped._pair_batches(old[layer], new[layer], old.shape[1] // 4)
        assert len(batches) > 1
        for batch in batches:
            ends = [r for pair in batch for r in pair]
            assert len(ends) == len(set(ends))  # no rank twice in one batch

"""Communicator from Python: numpy arrays and torch tensors moved in place over loopback (threads of
one process, which only works because execute() releases the GIL) and gloo (threads, and processes
on 127.0.0.1), with bad tensors refused by name."""

import numpy as np
import pytest

import eplb
from conftest import HAVE_TORCH, needs_torch, pattern, run_processes, run_threads
from test_stores import DictStore


def exchange(comm, rank, size, make, rounds=2, sizes=(1, 4096, 100_003)):
    """All-to-all of a few messages per pair and round, checked byte for byte."""
    for _ in range(rounds):
        recvs = []
        for peer in range(size):
            if peer == rank:
                continue
            for i, n in enumerate(sizes):
                comm.add_send(make(pattern(rank, peer, i, n)), peer)
                buf = make(np.zeros(n, dtype=np.uint8))
                comm.add_recv(buf, peer)
                recvs.append((peer, i, n, buf))
        assert comm.pending == 2 * len(recvs)
        comm.execute()
        assert comm.pending == 0
        for peer, i, n, buf in recvs:
            assert np.array_equal(np.asarray(buf), pattern(peer, rank, i, n)), f"from {peer}, message {i}"
    return True


def as_numpy(a):
    return a


def as_torch(a):
    import torch

    return torch.from_numpy(a.copy())


KINDS = [as_numpy] + ([as_torch] if HAVE_TORCH else [])


@pytest.mark.parametrize("make", KINDS, ids=lambda f: f.__name__)
def test_loopback_threads(make):
    world = eplb.LoopbackWorld(3)
    comms = [eplb.Communicator("loopback", r, 3, world=world, timeout=20) for r in range(3)]
    run_threads(3, lambda r: exchange(comms[r], r, 3, make))
    assert comms[0].backend == "loopback" and comms[0].capabilities["host_memory"]


@pytest.mark.parametrize("store_kind", ["memory", "python"])
def test_gloo_threads_meet_through_a_store(store_kind):
    store = eplb.MemoryStore() if store_kind == "memory" else eplb.TorchStore(DictStore())

    def rank_main(r):
        with eplb.Communicator("gloo", r, 2, eplb.PrefixStore(store, "t1"), timeout=20) as c:
            return exchange(c, r, 2, as_numpy)

    assert run_threads(2, rank_main) == [True, True]


def gloo_rank(rank, size, store_spec, kind):
    import numpy as np  # noqa: F811 - spawned process
    import eplb
    import test_comm

    store = eplb.FileStore(store_spec) if not store_spec.isdigit() else eplb.TCPStore("127.0.0.1", int(store_spec))
    make = test_comm.as_torch if kind == "torch" else test_comm.as_numpy
    with eplb.Communicator("gloo", rank, size, store, gloo_transport="tcp", timeout=30, lanes=2) as c:
        return test_comm.exchange(c, rank, size, make)


@pytest.mark.parametrize("kind", ["numpy"] + (["torch"] if HAVE_TORCH else []))
def test_gloo_processes_file_store(tmp_path, kind):
    assert run_processes(3, gloo_rank, str(tmp_path / "rdv"), kind) == [True] * 3


def test_gloo_processes_tcp_store():
    server = eplb.TCPStore("127.0.0.1", 0, serve=True)
    assert run_processes(2, gloo_rank, str(server.port), "numpy") == [True, True]


def test_bad_tensors_are_refused_by_name():
    world = eplb.LoopbackWorld(2)
    c = eplb.Communicator("loopback", 0, 2, world=world, timeout=5)
    with pytest.raises(eplb.InvalidArgument, match="tensor: is not C-contiguous"):
        c.add_send(np.zeros((4, 4))[:, ::2], 1)
    ro = np.zeros(8)
    ro.flags.writeable = False
    c.add_send(ro, 1)  # sending from read-only memory is fine
    with pytest.raises(eplb.InvalidArgument, match="tensor: is read-only"):
        c.add_recv(ro, 1)
    with pytest.raises(eplb.InvalidArgument, match="tensor: expected a tensor or array"):
        c.add_send([1, 2, 3], 1)
    with pytest.raises(eplb.InvalidArgument, match="peer"):
        c.add_send(np.zeros(8), 5)
    with pytest.raises(eplb.InvalidArgument, match="the loopback backend needs a LoopbackWorld"):
        eplb.Communicator("loopback", 0, 2)
    with pytest.raises(eplb.InvalidArgument, match="fast_mode: unknown option"):
        eplb.Communicator("loopback", 0, 2, world=world, fast_mode=True)
    with pytest.raises(eplb.InvalidArgument, match="unknown"):
        eplb.Communicator("carrier_pigeon", 0, 2, world=world)
    with pytest.raises(ValueError, match='device: "tpu" is not'):
        eplb.Communicator("loopback", 0, 2, world=world, device="tpu")
    c.close()
    with pytest.raises(eplb.InvalidArgument, match="already closed"):
        c.execute()


@needs_torch
def test_torch_tensor_errors():
    import torch

    world = eplb.LoopbackWorld(2)
    c = eplb.Communicator("loopback", 0, 2, world=world, timeout=5)
    with pytest.raises(eplb.InvalidArgument, match="tensor: is not contiguous"):
        c.add_send(torch.zeros(4, 6).t(), 1)
    c.add_send(torch.zeros(4, requires_grad=True), 1)  # parameters are sent as they are (detached view)
    c.set_stream(None)  # no stream on the host: accepted, as vLLM calls it
    with pytest.raises(eplb.InvalidArgument, match="no native streams"):
        c.set_stream(12345)


def test_a_silent_peer_times_out_naming_it():
    world = eplb.LoopbackWorld(2)
    c = eplb.Communicator("loopback", 0, 2, world=world, timeout=0.3)
    c.add_recv(np.zeros(16, dtype=np.uint8), 1)
    with pytest.raises(eplb.Error) as info:
        c.execute()
    assert info.value.code == "timeout" and "1" in str(info.value)
    assert c.pending == 0  # the failed batch was dropped


def test_a_dead_peer_is_reported():
    world = eplb.LoopbackWorld(2)
    c = eplb.Communicator("loopback", 0, 2, world=world, timeout=10)
    world.mark_dead(1)
    c.add_recv(np.zeros(16, dtype=np.uint8), 1)
    with pytest.raises(eplb.PeerFailure):
        c.execute()

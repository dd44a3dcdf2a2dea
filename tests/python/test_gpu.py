"""CUDA tensors through eplb from Python, on one GPU: ranks are processes sharing it (the backends that
run that way: gloo over TCP and over shared memory). Run by gpu_suite.py (suite gpu)."""

import numpy as np

import vllm_shaped
from ranks import pattern, run_processes


def _cases(*cases):
    def mark(fn):
        fn.cases = list(cases)
        try:
            import pytest

            names = fn.__code__.co_varnames[: len(cases[0])]
            # One name: pytest wants the bare values, not 1-tuples.
            values = [c[0] for c in cases] if len(names) == 1 else cases
            return pytest.mark.parametrize(",".join(names), values)(fn)
        except ImportError:
            return fn

    return mark


def exchange_rank(rank, size, rdv, transport):
    import torch

    import eplb

    torch.cuda.set_device(0)
    stream = torch.cuda.Stream()
    with eplb.Communicator("gloo", rank, size, eplb.FileStore(rdv), device="cuda:0", gloo_transport=transport,
                           timeout=60) as c:
        c.set_stream(stream)  # a torch stream: eplb's copies are ordered on it
        for _ in range(3):
            recvs = []
            for peer in range(size):
                if peer == rank:
                    continue
                for i, n in enumerate((1, 4096, 3_000_001)):
                    c.add_send(torch.from_numpy(pattern(rank, peer, i, n)).cuda(), peer)
                    buf = torch.zeros(n, dtype=torch.uint8, device="cuda")
                    c.add_recv(buf, peer)
                    recvs.append((peer, i, n, buf))
            torch.cuda.current_stream().synchronize()  # the sends' data is in place before eplb reads it
            c.execute()
            stream.synchronize()
            for peer, i, n, buf in recvs:
                assert np.array_equal(buf.cpu().numpy(), pattern(peer, rank, i, n)), (peer, i)
        # A CUDA tensor on a host communicator is refused by name.
        world = eplb.LoopbackWorld(1)
        host = eplb.Communicator("loopback", 0, 1, world=world)
        try:
            host.add_send(torch.zeros(4, device="cuda"), 0)
            raise AssertionError("a CUDA tensor was accepted by a host communicator")
        except eplb.InvalidArgument as e:
            assert "tensor: is on cuda:0" in str(e), str(e)
    return True


@_cases(("tcp",), ("shared_memory",))
def test_gloo_cuda_tensors(transport, tmp_path):
    assert run_processes(2, exchange_rank, str(tmp_path / "rdv"), transport) == [True, True]


class TorchGlooStaged:
    """vLLM's torch_gloo shape: CUDA tensors staged through the host around a Gloo batch_isend_irecv."""

    def __init__(self):
        self.ops = []

    def add_send(self, tensor, dst_rank):
        self.ops.append(("send", tensor, dst_rank))

    def add_recv(self, tensor, src_rank):
        self.ops.append(("recv", tensor, src_rank))

    def execute(self):
        import torch.distributed as dist

        p2p, back = [], []
        for kind, t, peer in self.ops:
            if kind == "send":
                p2p.append(dist.P2POp(dist.isend, t.cpu(), peer))
            else:
                host = t.new_empty(t.shape, device="cpu")
                p2p.append(dist.P2POp(dist.irecv, host, peer))
                back.append((t, host))
        self.ops.clear()
        if p2p:
            for req in dist.batch_isend_irecv(p2p):
                req.wait()
        for t, host in back:
            t.copy_(host)


def rearrange_rank(rank, size, rdv, transport):
    import torch
    import torch.distributed as dist

    import eplb
    import eplb.vllm

    torch.cuda.set_device(0)
    old, new = vllm_shaped.maps(ranks=size, seed=11)
    dist.init_process_group("gloo", init_method=f"file://{rdv}.torch", rank=rank, world_size=size)
    out = []
    try:
        store = eplb.PrefixStore(eplb.as_store(dist.distributed_c10d._get_default_store()), "eplb")
        ours = eplb.vllm.EplbCommunicator("gloo", rank=rank, size=size, store=store, device="cuda:0",
                                          gloo_transport=transport, timeout=60)
        stream = torch.cuda.Stream()
        ours.set_stream(stream)
        for comm, interface in ((TorchGlooStaged(), "pr33176"), (ours, "pr33176"), (ours, "list"), (ours, "batched")):
            weights = [[torch.from_numpy(w).cuda() for w in layer] for layer in vllm_shaped.make_weights(old, rank, size)]
            torch.cuda.synchronize()
            vllm_shaped.rearrange(old, new, weights, rank, size, comm, interface)
            torch.cuda.synchronize()
            host = [[t.cpu().numpy() for t in layer] for layer in weights]
            vllm_shaped.check_weights(new, host, rank, size)
            out.append(b"".join(t.tobytes() for layer in host for t in layer))
        ours.close()
    finally:
        dist.destroy_process_group()
    return out


@_cases(("tcp",), ("shared_memory",))
def test_vllm_shaped_rearrangement_matches_torch_gloo(transport, tmp_path):
    for reference, *ours in run_processes(2, rearrange_rank, str(tmp_path / "rdv"), transport):
        assert ours == [reference] * 3  # PR #33176's interface, the list one, the newest with batches


def state_rank(rank, size, rdv, engine):
    import torch

    import eplb

    torch.cuda.set_device(0)
    slots, experts, layers = 3, 4, 2
    weights = []
    for layer in range(layers):
        w = torch.zeros(slots, 64, dtype=torch.uint8, device="cuda")
        for s in range(slots):
            w[s] = (rank * slots + s) % experts + 10 * layer
        weights.append([w])
    serving = torch.cuda.Stream()
    config = {"communicator": "gloo", "window_size": 8, "step_interval": 8, "timeout_ms": 60000}
    n = slots * size
    # vLLM's layers: an int32 load counter and int64 maps, the engine's own CUDA tensors.
    given = {"load": torch.zeros(layers, n, dtype=torch.int32, device="cuda"),
             "phy2log": torch.full((layers, n), 99, dtype=torch.int64, device="cuda"),
             "log2phy": torch.full((layers, experts, n - experts + 1), 99, dtype=torch.int64, device="cuda"),
             "replica_count": torch.full((layers, experts), 99, dtype=torch.int64, device="cuda")} if engine else None
    with eplb.State(config, weights, num_experts=experts, rank=rank, num_ranks=size, store=eplb.FileStore(rdv),
                    device="cuda:0", serving_stream=serving, buffers=given) as state:
        load = state.load_buffer
        want = (torch.int32, torch.int64) if engine else (torch.int64, torch.int32)
        assert load.is_cuda and load.dtype == want[0] and tuple(load.shape) == (layers, n)
        assert state.phy2log.is_cuda and state.phy2log.dtype == want[1]
        if engine:
            assert load.data_ptr() == given["load"].data_ptr()
            assert state.phy2log.data_ptr() == given["phy2log"].data_ptr()
        for _ in range(200):
            with torch.cuda.stream(serving):
                load[:, 2] += 100  # expert 2 (one replica, on rank 0) is hot
                load += 1
            report = state.step()
            if report["rebalance_finished"] and not report["rebalance_skipped"]:
                break
        serving.synchronize()
        phy2log = state.phy2log.cpu().numpy()
        assert phy2log.tolist() == state.maps().tolist()
        for layer in range(layers):
            for s in range(slots):
                expert = int(phy2log[layer][rank * slots + s])
                assert int(weights[layer][0][s][0]) == expert + 10 * layer
        return phy2log.tolist()


@_cases((False,), (True,))
def test_state_on_cuda_tensors(engine, tmp_path):
    maps = run_processes(2, state_rank, str(tmp_path / "rdv"), engine)
    assert maps[0] == maps[1]
    assert maps[0][0] != [p % 4 for p in range(6)], "the hot expert should have moved"

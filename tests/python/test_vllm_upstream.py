"""vLLM's own rearrange_expert_weights_inplace, unchanged, with eplb.vllm.EplbCommunicator, byte for
byte against the same call with vLLM's own communicator (torch_gloo). Runs where vLLM is importable
(a deployment checks its vLLM version with it: `pytest tests/python/test_vllm_upstream.py`); skipped
elsewhere, which is every machine of ours: vLLM cannot be installed here (no PyPI)."""

import inspect

import pytest

from conftest import run_processes

vllm_execute = pytest.importorskip("vllm.distributed.eplb.rebalance_execute",
                                   reason="vLLM is not installed (its own rearrangement cannot run)")


def _call_vllm(old, new, weights, group, comm):
    """vLLM's function across its versions: the communicator and the receive buffer became
    arguments over time, so pass what this version's signature takes."""
    import torch

    params = inspect.signature(vllm_execute.rearrange_expert_weights_inplace).parameters
    kwargs = {}
    if "communicator" in params:
        kwargs["communicator"] = comm
    if "expert_buffer" in params:
        kwargs["expert_buffer"] = [torch.empty_like(w) for w in weights[0]]
    vllm_execute.rearrange_expert_weights_inplace(torch.from_numpy(old), torch.from_numpy(new), weights, group,
                                                  **kwargs)


def _vllm_gloo_communicator(group):
    from vllm.distributed.eplb import eplb_communicator as ec

    return ec.TorchDistGlooStagedEplbCommunicator(cpu_group=group)


def upstream_rank(rank, size, rdv):
    import torch
    import torch.distributed as dist

    import eplb
    import eplb.vllm
    import vllm_shaped

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    old, new = vllm_shaped.maps(ranks=size, seed=7)
    dist.init_process_group("gloo", init_method=f"file://{rdv}.torch", rank=rank, world_size=size)
    results = []
    try:
        group = dist.group.WORLD
        store = eplb.PrefixStore(eplb.as_store(dist.distributed_c10d._get_default_store()), "eplb")
        ours = eplb.vllm.EplbCommunicator("gloo", rank=rank, size=size, store=store, device=device, timeout=60)
        for comm in (_vllm_gloo_communicator(group), ours):
            weights = [[torch.from_numpy(w).to(device) for w in layer]
                       for layer in vllm_shaped.make_weights(old, rank, size)]
            _call_vllm(old, new, weights, group, comm)
            if device != "cpu":
                torch.cuda.synchronize()
            host = [[w.cpu() for w in layer] for layer in weights]
            vllm_shaped.check_weights(new, host, rank, size)
            results.append(b"".join(t.numpy().tobytes() for layer in host for t in layer))
    finally:
        dist.destroy_process_group()
    return results


def test_vllms_own_rearrangement_through_eplb(tmp_path):
    for vllm_bytes, eplb_bytes in run_processes(2, upstream_rank, str(tmp_path / "rdv")):
        assert eplb_bytes == vllm_bytes

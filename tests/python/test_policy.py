"""rebalance(): bit for bit the C++ policy (compared with `eplb plan`), returns of the input's kind,
errors naming the argument."""

import json
import os
import subprocess

import numpy as np
import pytest

import eplb
from conftest import HAVE_TORCH, needs_torch

EXE = os.environ.get("EPLB_EXE")


def cli_plan(load, num_replicas, num_groups, num_nodes, num_ranks, old=None, policy="default"):
    request = {"load": np.asarray(load, dtype=np.float64).tolist(), "num_replicas": num_replicas,
               "num_groups": num_groups, "num_nodes": num_nodes, "num_ranks": num_ranks, "policy": policy}
    if old is not None:
        request["old_phy2log"] = np.asarray(old).tolist()
    out = subprocess.run([EXE, "plan", "-"], input=json.dumps(request), capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


def padded(rows, width):
    return [[list(r) + [-1] * (width - len(r)) for r in layer] for layer in rows]


CASES = [
    # layers, experts, replicas, groups, nodes, ranks
    (2, 12, 16, 4, 2, 8),     # hierarchical (DeepSeek's README example shape)
    (3, 16, 24, 4, 3, 6),     # global: 4 groups over 3 nodes
    (4, 64, 80, 8, 2, 16),
    (1, 8, 8, 1, 1, 4),       # no redundant slots
]


@pytest.mark.skipif(EXE is None, reason="EPLB_EXE (the eplb tool) is not set")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("policy", ["default", "min_move"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_rebalance_matches_the_cpp_policy(case, policy, dtype):
    layers, experts, replicas, groups, nodes, ranks = case
    rng = np.random.default_rng(sum(case))
    load = rng.integers(0, 1000, size=(layers, experts)).astype(dtype)
    old = np.stack([np.arange(replicas) % experts for _ in range(layers)])
    rng.shuffle(old, axis=1)
    for previous in (None, old):
        phy2log, log2phy, counts = eplb.rebalance(load, replicas, groups, nodes, ranks, old=previous, policy=policy)
        want = cli_plan(load, replicas, groups, nodes, ranks, previous, policy)
        assert isinstance(phy2log, np.ndarray) and phy2log.dtype == np.int64
        assert phy2log.shape == (layers, replicas)
        assert log2phy.shape == (layers, experts, replicas - experts + 1)
        assert counts.shape == (layers, experts)
        assert phy2log.tolist() == want["phy2log"]
        assert log2phy.tolist() == padded(want["log2phy"], replicas - experts + 1)
        assert counts.tolist() == want["replica_count"]


def test_readme_example_is_deepseeks():
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, _, _ = eplb.rebalance(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


@needs_torch
def test_torch_in_torch_out_same_maps():
    import torch

    rng = np.random.default_rng(7)
    load = rng.integers(0, 500, size=(3, 32)).astype(np.float32)
    want = eplb.rebalance(load, 48, 4, 2, 8)
    got = eplb.rebalance(torch.from_numpy(load).requires_grad_(False), 48, 4, 2, 8)
    for g, w in zip(got, want):
        assert isinstance(g, torch.Tensor) and g.dtype == torch.int64
        assert g.tolist() == w.tolist()
    old = torch.from_numpy(want[0]).to(torch.int32)
    moved = eplb.rebalance(torch.from_numpy(load), 48, 4, 2, 8, old=old, policy="min_move")
    assert moved[0].tolist() == eplb.rebalance(load, 48, 4, 2, 8, old=want[0], policy="min_move")[0].tolist()


def expect(exc_type, text, fn, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert text in str(info.value), str(info.value)
    return info.value


def test_bad_inputs_name_the_argument():
    load = np.ones((2, 8), dtype=np.float32)
    e = expect(eplb.InvalidArgument, "weight: is not C-contiguous", eplb.rebalance, np.ones((2, 16))[:, ::2], 8, 1, 1, 2)
    assert e.code == "invalid_argument" and isinstance(e, ValueError)
    expect(eplb.InvalidArgument, "weight: expected 2 dimensions, got 1", eplb.rebalance, np.ones(8), 8, 1, 1, 2)
    expect(eplb.InvalidArgument, "weight: dtype float16 is not supported", eplb.rebalance,
           load.astype(np.float16), 8, 1, 1, 2)
    expect(eplb.InvalidArgument, "weight: expected a tensor or array", eplb.rebalance, [[1.0, 2.0]], 2, 1, 1, 1)
    expect(eplb.InvalidArgument, "weight[0][3]: must be a finite number", eplb.rebalance,
           np.array([[1, 1, 1, np.nan]]), 4, 1, 1, 1)
    expect(eplb.InvalidArgument, "num_replicas: 9 is not divisible by num_ranks 2", eplb.rebalance, load, 9, 1, 1, 2)
    expect(eplb.InvalidArgument, "old: dtype float32 is not supported (use int32 or int64)", eplb.rebalance,
           load, 8, 1, 1, 2, old=np.zeros((2, 8), dtype=np.float32))
    expect(eplb.InvalidArgument, "old: shape 1x8 does not match", eplb.rebalance, load, 8, 1, 1, 2,
           old=np.zeros((1, 8), dtype=np.int64))
    expect(eplb.InvalidArgument, "old[1][2]: expert id 8 is out of range", eplb.rebalance, load, 8, 1, 1, 2,
           old=np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 8, 3, 4, 5, 6, 7]]))
    expect(eplb.InvalidArgument, 'policy: unknown policy "fast"', eplb.rebalance, load, 8, 1, 1, 2, policy="fast")


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_torch_errors_name_the_argument():
    import torch

    expect(eplb.InvalidArgument, "weight: is not contiguous", eplb.rebalance, torch.ones(16, 2).t(), 8, 1, 1, 2)
    expect(eplb.InvalidArgument, "weight: dtype bfloat16 is not supported", eplb.rebalance,
           torch.ones(2, 8, dtype=torch.bfloat16), 8, 1, 1, 2)

"""eplb inside vLLM: a weight-exchange communicator and placement policies.

Imports without vLLM. When vLLM is importable, the classes derive from vLLM's own interfaces
(``EplbCommunicator``, ``AbstractEplbPolicy``), so vLLM's isinstance checks pass.

``EplbCommunicator`` speaks both interfaces vLLM has had:

- PR #33176: ``add_send(tensor, dst_rank)``, ``add_recv(tensor, src_rank)``, ``execute()``,
  ``set_stream(stream)``;
- later (NIXL, #36276): ``add_send(tensors, dst_rank, expert_id)``, ``add_recv(tensors, src_rank,
  expert_id)``, ``execute(old_indices=None)`` and ``needs_profile_buffer_reservation``;
- newest: ``set_transfer_context(old_indices, layer_idx)`` before the adds (and before every batch
  when vLLM cuts a layer into migration batches), then ``execute()``.

Ranks are EP-group ranks, as in vLLM. See the README's "From Python and vLLM" for how a deployment
switches to it.
"""

import eplb as _eplb

try:  # vLLM's interface, when vLLM is installed
    from vllm.distributed.eplb.eplb_communicator import EplbCommunicator as _CommunicatorBase
except Exception:  # noqa: BLE001 - any import failure means "no vLLM here"
    _CommunicatorBase = object

try:
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy as _PolicyBase
except Exception:  # noqa: BLE001
    _PolicyBase = object

__all__ = ["EplbCommunicator", "EplbDefaultPolicy", "EplbMinMovePolicy", "create_eplb_communicator", "install",
           "register"]


class EplbCommunicator(_CommunicatorBase):
    """vLLM's EPLB communicator on eplb's backends: "gloo" (``gloo_transport`` "tcp" or
    "shared_memory"), "nccl", "stateless_nccl", "cuda_ipc" (and "loopback" for tests).

    ``store``: where the EP ranks meet (eplb Store or torch.distributed Store; vLLM's default store
    is used when None and torch.distributed is initialised). ``device``: where the expert weights
    live. ``options``: eplb communicator options (timeout in seconds, chunk_bytes, lanes...).
    """

    def __init__(self, backend="gloo", *, rank, size, store=None, device="cpu", cuda_stream=None, world=None,
                 **options):
        if store is None and backend != "loopback":
            store = _default_store()
        self._comm = _eplb.Communicator(backend, rank, size, store, device, world=world, **options)
        self._cuda_stream = None
        self._layer = None  # set_transfer_context's, named in a failure's note
        if cuda_stream is not None:
            self.set_stream(cuda_stream)

    # -- the interface of PR #33176, extended to lists of tensors with an expert id (later vLLM)
    def add_send(self, tensor, dst_rank, expert_id=None):
        if isinstance(tensor, (list, tuple)):
            for t in tensor:
                self._comm.add_send(t, dst_rank)
        else:
            self._comm.add_send(tensor, dst_rank)

    def add_recv(self, tensor, src_rank, expert_id=None):
        if isinstance(tensor, (list, tuple)):
            for t in tensor:
                self._comm.add_recv(t, src_rank)
        else:
            self._comm.add_recv(tensor, src_rank)

    def execute(self, old_indices=None):
        """Runs the queued layer exchange. ``old_indices`` (later vLLM) is not needed: eplb matches
        sends and receives by order, as torch's batch_isend_irecv does."""
        try:
            self._comm.execute()
        except Exception as e:
            if self._layer is not None and hasattr(e, "add_note"):
                e.add_note(f"eplb.vllm: while exchanging MoE layer {self._layer}")
            raise

    def set_transfer_context(self, old_indices, layer_idx):
        """Newest vLLM: the layer's old map before its transfers. eplb needs neither (it pairs sends
        and receives by order, like batch_isend_irecv); kept so that a failure can name the layer."""
        self._layer = layer_idx

    def set_stream(self, cuda_stream):
        self._cuda_stream = cuda_stream
        self._comm.set_stream(cuda_stream)

    @property
    def needs_profile_buffer_reservation(self):
        # eplb allocates its staging memory when the communicator is made, not on first use.
        return False

    @property
    def backend(self):
        return self._comm.backend

    def close(self):
        self._comm.close()

    def _log_initialized(self):  # vLLM calls it on its own communicators; nothing to log here
        pass


def _default_store():
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        if dist.is_initialized():
            return _eplb.PrefixStore(_eplb.TorchStore(distributed_c10d._get_default_store()), "eplb")
    except Exception:  # noqa: BLE001
        pass
    raise ValueError("store: none given and torch.distributed is not initialised (pass an eplb or torch Store)")


# vLLM's communicator names and what eplb runs for them. torch_gloo and None get gloo (safe beside the
# serving loop's NCCL, so async EPLB can use it); pynccl is for elastic EP, where eplb's
# stateless_nccl makes its own NCCL communicator.
VLLM_BACKENDS = {None: "gloo", "torch_gloo": "gloo", "torch_nccl": "nccl", "pynccl": "stateless_nccl", "nixl": "gloo"}
_generations = {}


def create_eplb_communicator(group_coordinator, backend=None, expert_weights=None, store=None, **options):
    """A drop-in for vLLM's factory of the same name: an EplbCommunicator for a vLLM GroupCoordinator
    (its rank_in_group, world_size and device). ``backend``: a vLLM name (mapped by VLLM_BACKENDS) or
    an eplb one. The ranks meet through ``store``, by default torch's default store, under a prefix
    named after the group and a count of the communicators made for it (every EP rank makes them in
    the same order), so that a communicator made again never reads an old one's keys."""
    name = VLLM_BACKENDS.get(backend, backend)
    device = getattr(group_coordinator, "device", "cpu")
    if expert_weights:
        device = getattr(expert_weights[0], "device", device)
    group = getattr(group_coordinator, "unique_name", "ep")
    generation = _generations.get(group, 0)
    _generations[group] = generation + 1
    base = _eplb.as_store(store) if store is not None else _default_store()
    return EplbCommunicator(name, rank=group_coordinator.rank_in_group, size=group_coordinator.world_size,
                            store=_eplb.PrefixStore(base, f"{group}/{generation}"), device=device, **options)


def install():
    """Makes vLLM build eplb communicators: replaces ``create_eplb_communicator`` in the vLLM modules
    that call it (eplb_communicator and eplb_state; elastic_execute when present). Returns the
    modules patched. Call it in every worker process before the engine starts (see the README)."""
    import importlib

    patched = []
    for module in ("vllm.distributed.eplb.eplb_communicator", "vllm.distributed.eplb.eplb_state",
                   "vllm.distributed.elastic_ep.elastic_execute"):
        try:
            m = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(m, "create_eplb_communicator"):
            m.create_eplb_communicator = create_eplb_communicator
            patched.append(module)
    if not patched:
        raise ImportError("vLLM's create_eplb_communicator was not found (is vLLM >= the PR #33176 merge installed?)")
    return patched


class EplbDefaultPolicy(_PolicyBase):
    """vLLM's default EPLB policy, run by eplb's C++ implementation (the same maps, bit for bit)."""

    policy = "default"

    @classmethod
    def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices=None):
        return _eplb.rebalance(weight, num_replicas, num_groups, num_nodes, num_ranks,
                               old=old_global_expert_indices, policy=cls.policy)


class EplbMinMovePolicy(EplbDefaultPolicy):
    """Nearly the default policy's balance with far fewer expert moves (needs the old map)."""

    policy = "min_move"


def register(name="eplb_min_move", policy=EplbMinMovePolicy):
    """Adds ``policy`` to vLLM's policy registry (``EPLB_POLICIES``) under ``name``; returns the
    registry. Requires vLLM. (vLLM's config also validates the policy name against a Literal: see the
    README for the one-line patch a deployment needs.)"""
    from vllm.distributed.eplb import policy as vllm_policy

    vllm_policy.EPLB_POLICIES[name] = policy
    return vllm_policy.EPLB_POLICIES

"""eplb: expert-parallel load balancing for MoE serving engines, from Python.

Tensors go in and out without copies: numpy arrays and torch tensors (CPU or CUDA) are read in place
through the buffer protocol or DLPack, and every call that can block releases the GIL.

- ``rebalance(weight, num_replicas, num_groups, num_nodes, num_ranks, old=None, policy="default")``:
  vLLM's ``rebalance_experts`` contract (phy2log, log2phy, replica counts).
- ``Communicator(backend, rank, size, store, device, **options)``: eplb's weight exchange.
- ``State(config, weights, ...)``: the whole runtime (load window, rebalances, commits).
- Stores: ``MemoryStore``, ``FileStore``, ``TCPStore``, ``PrefixStore`` and ``TorchStore`` (over a
  torch.distributed Store).
- ``eplb.vllm``: a communicator and policies for vLLM.
"""

import json as _json

from . import _eplb
from ._errors import BackendUnavailable, Error, InvalidArgument, PeerFailure, Timeout
from ._eplb import FileStore, LoopbackWorld, MemoryStore, PrefixStore, Store, TCPStore, TorchStore, backends
from ._tensors import device_of, from_dlpack_capsule, is_torch, like, stream_handle

__version__ = _eplb.__version__

__all__ = [
    "BackendUnavailable", "Communicator", "Error", "FileStore", "InvalidArgument", "LoopbackWorld",
    "MemoryStore", "PeerFailure", "PrefixStore", "State", "Store", "TCPStore", "Timeout", "TorchStore",
    "as_store", "backends", "rebalance",
]


def _plain(tensor):
    # Weights are parameters: DLPack refuses tensors that require grad, and detach() is a view.
    if getattr(tensor, "requires_grad", False):
        return tensor.detach()
    return tensor


def _plain_dict(tensors):
    return {k: _plain(v) for k, v in (tensors or {}).items()}


def rebalance(weight, num_replicas, num_groups, num_nodes, num_ranks, old=None, policy="default"):
    """A new placement for ``weight`` [layers, experts] (loads, host memory).

    Returns ``(phy2log [layers, num_replicas], log2phy [layers, experts, num_replicas - experts + 1]
    padded with -1, replica counts [layers, experts])``, int64, numpy arrays for numpy input and
    torch tensors for torch input. ``old`` is the current phy2log: with it, experts a rank keeps stay
    in their slots; ``policy="min_move"`` also moves far fewer experts. Bit for bit the C++ policy
    (and vLLM's default policy). Bad input raises ``InvalidArgument`` naming the argument.
    """
    phy2log, log2phy, counts = _eplb._rebalance(
        _plain(weight), num_replicas, num_groups, num_nodes, num_ranks,
        None if old is None else _plain(old), policy)
    return like(phy2log, weight), like(log2phy, weight), like(counts, weight)


def as_store(store):
    """An eplb Store: ``store`` itself, or a TorchStore over a torch.distributed Store; None stays None."""
    if store is None or isinstance(store, Store):
        return store
    return TorchStore(store)


class Communicator:
    """Point-to-point exchange between the ranks of an EP group (eplb's C++ communicator).

    ``backend``: "gloo" (TCP or shared memory between processes), "loopback" (threads of this process,
    pass ``world=LoopbackWorld(size)``), "nccl", "stateless_nccl" or "cuda_ipc" (GPUs).
    ``store``: where ranks meet (an eplb Store or a torch.distributed Store).
    ``device``: "cpu", "cuda", "cuda:N", an int or a torch.device: where the tensors live.
    ``options``: timeout (s), chunk_bytes, lanes, staging_bytes, hostname, nice, gloo_transport
    ("auto", "tcp", "shared_memory"), cuda_ipc_pull, max_gbps.

    Queue sends and receives, then ``execute()`` them as one batch. Between two ranks, sends and
    receives match in the order they were added. Tensors are used in place and must stay alive and
    unchanged until ``execute()`` returns (stream-ordered backends: until the stream reaches it).
    """

    def __init__(self, backend, rank, size, store=None, device="cpu", world=None, **options):
        kind, ordinal = device_of(device)
        self._c = _eplb._Communicator(backend, rank, size, as_store(store), kind, ordinal, world, options)

    def add_send(self, tensor, dst):
        self._c.add_send(_plain(tensor), dst)

    def add_recv(self, tensor, src):
        self._c.add_recv(_plain(tensor), src)

    def execute(self):
        """Runs every queued operation as one batch (without the GIL) and clears the queue."""
        self._c.execute()

    def set_stream(self, stream):
        """The stream that orders the transfers (a torch.cuda.Stream, a raw cudaStream_t, or None)."""
        self._c.set_stream(stream_handle(stream))

    def close(self):
        self._c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    rank = property(lambda self: self._c.rank)
    size = property(lambda self: self._c.size)
    backend = property(lambda self: self._c.backend)
    pending = property(lambda self: self._c.pending)
    capabilities = property(lambda self: self._c.capabilities)


class State:
    """eplb's runtime for one EP rank: call ``step()`` once per forward step on every rank.

    ``config``: a dict (or JSON text) of eplb's config fields (window_size, step_interval, use_async,
    policy, communicator, timeout_ms...). ``weights``: per MoE layer, the list of this rank's expert
    tensors, each [local slots, ...] and contiguous; they are read and rearranged in place.
    The router's counts go into ``load_buffer`` [layers, physical slots] (int64) or ``record_load``;
    ``phy2log``, ``log2phy`` and ``replica_count`` alias eplb's maps (int32, updated by commits).
    ``buffers``: the engine's own tensors instead, by name ("load" [layers, slots], "phy2log" [layers,
    slots], "log2phy" [layers, experts, slots - experts + 1] padded with -1, "replica_count"
    [layers, experts]), each int32 or int64, contiguous, on the state's device; eplb writes the maps
    and reads the load in the serving stream's order, and never clears the load (a counter the
    router only adds to: windows are differences of two readings). The properties then return them.

    Elastic EP: ``rescale()`` changes the rank set; a rank that joins constructs its State with
    ``join_epoch`` (the others' ``metrics["rank_set_epoch"] + 1``), its empty slots as ``weights``,
    ``num_ranks`` and ``rank`` of the new set. ``recover()`` serves on after a peer died;
    ``reload_expert(layer, expert, local_slot)`` loads an expert lost with it back from the engine's
    checkpoint (called on eplb's thread with the GIL); without it such experts are masked.
    """

    def __init__(self, config, weights, *, num_experts, rank, num_ranks, store, device="cpu",
                 num_groups=1, num_nodes=1, ranks_per_node=0, world=None, serving_stream=None,
                 comm_options=None, buffers=None, join_epoch=0, reload_expert=None):
        text = config if isinstance(config, str) else _json.dumps(config)
        kind, ordinal = device_of(device)
        weights = [[_plain(t) for t in layer] for layer in weights]
        self._kind = "torch" if weights and weights[0] and is_torch(weights[0][0]) else "numpy"
        self._s = _eplb._State(text, weights, num_experts, rank, num_ranks, as_store(store), kind, ordinal,
                               num_groups, num_nodes, ranks_per_node, world, comm_options or {},
                               stream_handle(serving_stream), _plain_dict(buffers), join_epoch, reload_expert)

    def rescale(self, new_size, rank_mapping, world=None, buffers=None):
        """Changes the rank set (every rank of it, between the same two steps): ``rank_mapping[r]``
        is old rank r's place in the new set or -1 when it leaves. ``world``: the new set's
        LoopbackWorld (threads); ``buffers``: the engine's tensors sized for the new set, where it
        gave them before. Returns the report (epoch, left, rank, num_ranks, layers_moved,
        bytes_received, seconds, fill_error). The load buffer and maps change size: read them again."""
        return self._s.rescale(new_size, list(rank_mapping), world,
                               None if buffers is None else _plain_dict(buffers))

    def recover(self, world_factory=None, buffers_factory=None):
        """Serving on after lost ranks (call it on every survivor once ``step()`` raised): returns the
        report with ``lost_ranks``, ``experts_reloaded`` and ``masked`` [(layer, expert)].
        ``world_factory(size)``: the survivors' LoopbackWorld; ``buffers_factory(size)``: the
        engine's tensors for that size."""
        factory = None if buffers_factory is None else (lambda size: _plain_dict(buffers_factory(size)))
        return self._s.recover(world_factory, factory)

    def restore_masked(self):
        """Masked experts back through ``reload_expert`` (every rank, between the same two steps, with
        no rebalance in flight: ``drain()`` first). Returns the report: ``experts_reloaded`` and the
        ``masked`` ones whose reload failed again."""
        return self._s.restore_masked()

    def masked_experts(self):
        """(layer, expert) pairs served without (lost with a rank, not loaded back): route them no token."""
        return self._s.masked_experts()

    rank = property(lambda self: self._s.rank)
    num_ranks = property(lambda self: self._s.num_ranks)

    def step(self, is_dummy=False):
        """One forward step (without the GIL); returns what happened (rebalance_started...)."""
        return self._s.step(is_dummy)

    def record_load(self, layer, counts):
        """Adds int64 counts (one per physical slot) for ``layer`` from the host."""
        self._s.record_load(layer, counts)

    def synchronize(self, timeout=60.0):
        """Waits until the map updates and load copies queued on the serving stream are done (the
        tensors below are updated in that stream's order; a torch engine gets this from its stream)."""
        self._s.synchronize(timeout)

    def drain(self):
        """Starts no rebalance after this step (call it in the same step on every rank, then step
        until ``metrics["rebalance_in_flight"]`` is False): a shutdown with nothing to abort."""
        self._s.drain()

    def stop(self):
        """Cancels a rebalance in flight and releases everything; idempotent."""
        self._s.stop()

    def _table(self, which):
        if self._s.has_engine_buffer(which):
            return self._s.table(self._s, which)
        return from_dlpack_capsule(self._s.table(self._s, which), self._kind)

    @property
    def load_buffer(self):
        if self._kind == "numpy" and not self._s.has_engine_buffer("load"):
            return self._s.load_array(self._s)
        return self._table("load")

    phy2log = property(lambda self: self._table("phy2log"))
    log2phy = property(lambda self: self._table("log2phy"))
    replica_count = property(lambda self: self._table("replica_count"))
    metrics = property(lambda self: self._s.metrics())
    communicator = property(lambda self: self._s.communicator)

    def maps(self):
        """phy2log of the committed layers, copied to the host (numpy int32)."""
        return self._s.maps()

    def history(self):
        """The last ``history_size`` rebalance records of this rank (dicts, oldest first): id,
        steps, outcome ("committed", "skipped", "failed", "stopped") and error, global balancedness
        before/after/planned, bytes moved and seconds per phase. ``step()`` returns the one that
        ended in that step as ``finished``."""
        return self._s.history()

    def prometheus_text(self, prefix="eplb"):
        """This rank's metrics in Prometheus text format 0.0.4, for an engine's /metrics endpoint."""
        return self._s.prometheus_text(prefix)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

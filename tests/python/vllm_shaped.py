"""A rearrangement shaped like vLLM's rearrange_expert_weights_inplace (move_to_buffer +
move_from_buffer per layer, one execute() per layer), written for these tests from vLLM's documented
behaviour so that eplb.vllm.EplbCommunicator can be checked against it without vLLM installed.

`interface` picks how the communicator is driven: "pr33176" (one tensor per call, execute()),
"list" (all tensors of an expert per call with its id, execute(old_indices)), "context" (the newest:
set_transfer_context(old_indices, layer) first, lists with expert_id=, execute()) or "batched" (the
newest with migration batching: the remote transfers cut into batches in which every rank talks to
at most one peer, set_transfer_context and execute() once per batch, every rank through every batch).
Works on numpy arrays and torch tensors alike."""

import numpy as np


def _copy(dst, src):
    if hasattr(dst, "copy_"):
        dst.copy_(src)
    else:
        dst[...] = src


def _empty_like(w):
    if hasattr(w, "copy_"):
        import torch

        return torch.empty_like(w)
    return np.empty_like(w)


def _ranks_holding(indices, expert, num_local):
    return sorted({int(p) // num_local for p in np.flatnonzero(indices == expert)})


def _senders_and_receivers(old, new, expert, num_local):
    senders = _ranks_holding(old, expert, num_local)
    receivers = [r for r in _ranks_holding(new, expert, num_local) if r not in senders]
    return senders, receivers


def move_to_buffer(num_local, old, new, weights, buffers, ep_rank, comm, interface, layer=0):
    base = ep_rank * num_local
    old_local, new_local = old[base:base + num_local], new[base:base + num_local]
    unchanged = old_local == new_local
    received_locally = unchanged | ((new_local != -1) & np.isin(new_local, old_local))
    # Sources: the first local row of every expert this rank holds.
    send_rows = {}
    for row, e in enumerate(old_local):
        if e != -1:
            send_rows.setdefault(int(e), row)
    # Receives: the first row wanting each missing expert (its primary row).
    primary_rows = {}
    for row in np.flatnonzero(~received_locally & (new_local != -1)):
        primary_rows.setdefault(int(new_local[row]), int(row))
    primary_mask = np.zeros(num_local, dtype=bool)
    primary_mask[list(primary_rows.values())] = True
    # Local moves go through the buffer, which makes permutations in place safe.
    for row in np.flatnonzero(~unchanged & received_locally):
        src = send_rows[int(new_local[row])]
        for w, b in zip(weights, buffers):
            _copy(b[row], w[src])
    flows = _flows(old, new, num_local, ep_rank, send_rows, primary_rows)
    if interface == "batched":
        _run_batches(flows, weights, buffers, send_rows, primary_rows, ep_rank, comm, old, new, layer)
    else:
        _run_at_once(flows, weights, buffers, send_rows, primary_rows, ep_rank, comm, old, layer, interface)
    return unchanged, received_locally, primary_rows, primary_mask


def _destinations(senders, receivers, i):
    """The receivers the i-th holder sends to: a block of them, plus one of the remainder."""
    n = len(receivers) // len(senders)
    dsts = receivers[i * n:(i + 1) * n]
    if len(senders) * n + i < len(receivers):
        dsts.append(receivers[len(senders) * n + i])
    return dsts


def _flows(old, new, num_local, ep_rank, send_rows, primary_rows):
    """(src, dst, expert) of every remote transfer this rank takes part in, by vLLM's rule: the
    receivers of an expert split over its holders in blocks, the remainder one each."""
    flows = []
    for e in sorted(send_rows):
        senders, receivers = _senders_and_receivers(old, new, e, num_local)
        if not receivers:
            continue
        flows += [(ep_rank, dst, e) for dst in _destinations(senders, receivers, senders.index(ep_rank))]
    for e in sorted(primary_rows):
        senders, receivers = _senders_and_receivers(old, new, e, num_local)
        n = len(receivers) // len(senders)
        j = receivers.index(ep_rank)
        src = senders[j // n] if j < len(senders) * n else senders[j - len(senders) * n]
        flows.append((src, ep_rank, e))
    return flows


def _post(flows, weights, buffers, send_rows, primary_rows, ep_rank, comm, interface):
    for src, dst, e in flows:
        if src == ep_rank:
            add, peer, tensors = comm.add_send, dst, [w[send_rows[e]] for w in weights]
        else:
            add, peer, tensors = comm.add_recv, src, [b[primary_rows[e]] for b in buffers]
        if interface == "pr33176":
            for t in tensors:
                add(t, peer)
        else:
            add(tensors, peer, expert_id=e)


def _run_at_once(flows, weights, buffers, send_rows, primary_rows, ep_rank, comm, old, layer, interface):
    if interface == "context":
        comm.set_transfer_context(old, layer)
    _post(flows, weights, buffers, send_rows, primary_rows, ep_rank, comm, interface)
    if interface == "list":
        comm.execute(old)
    else:
        comm.execute()


def _pair_batches(old, new, num_local):
    """The remote transfers of the whole layer (every rank's), cut into batches in which every rank
    talks to at most one peer; every rank computes the same batches from the maps alone."""
    pairs = {}
    for e in sorted(set(new.tolist()) - {-1}):
        senders, receivers = _senders_and_receivers(old, new, e, num_local)
        if not senders:
            continue
        for i, src in enumerate(senders):
            for dst in _destinations(senders, receivers, i):
                pairs.setdefault((src, dst), []).append(e)
    batches = []
    for pair in sorted(pairs):
        for batch in batches:
            busy = {r for p in batch for r in p}
            if pair[0] not in busy and pair[1] not in busy:
                batch.append(pair)
                break
        else:
            batches.append([pair])
    return [{pair: pairs[pair] for pair in batch} for batch in batches]


def _run_batches(flows, weights, buffers, send_rows, primary_rows, ep_rank, comm, old, new, layer):
    mine = set(flows)
    for batch in _pair_batches(old, new, len(weights[0])):
        comm.set_transfer_context(old, layer)  # vLLM restores it before every batch
        in_batch = [(src, dst, e) for (src, dst), experts in batch.items() for e in experts if (src, dst, e) in mine]
        _post(in_batch, weights, buffers, send_rows, primary_rows, ep_rank, comm, "batched")
        comm.execute()


def move_from_buffer(weights, buffers, unchanged, received_locally, primary_rows, primary_mask, new_local):
    for row in np.flatnonzero(~unchanged & (received_locally | primary_mask)):
        for w, b in zip(weights, buffers):
            _copy(w[row], b[row])
    for row in np.flatnonzero(~unchanged & ~received_locally & ~primary_mask & (new_local != -1)):
        src = primary_rows[int(new_local[row])]
        for w in weights:
            _copy(w[row], w[src])


def rearrange(old_map, new_map, expert_weights, ep_rank, ep_size, comm, interface="pr33176"):
    """old_map, new_map: [layers, physical] numpy; expert_weights[layer] = tensors [local, ...]."""
    num_local = old_map.shape[1] // ep_size
    buffers = [_empty_like(w) for w in expert_weights[0]]
    for layer, weights in enumerate(expert_weights):
        old, new = old_map[layer], new_map[layer]
        state = move_to_buffer(num_local, old, new, weights, buffers, ep_rank, comm, interface, layer)
        base = ep_rank * num_local
        move_from_buffer(weights, buffers, *state, new[base:base + num_local])


def expert_payload(layer, expert, tensor, shape, dtype):
    n = int(np.prod(shape))
    return ((np.arange(n) * (tensor + 3) + layer * 1009 + expert * 31) % 241).astype(dtype).reshape(shape)


SHAPES = [((2, 33), np.float32), ((40,), np.uint8), ((3, 7), np.int64)]


def make_weights(old_map, ep_rank, ep_size):
    num_local = old_map.shape[1] // ep_size
    layers = []
    for layer in range(old_map.shape[0]):
        tensors = []
        for t, (shape, dtype) in enumerate(SHAPES):
            w = np.zeros((num_local,) + shape, dtype=dtype)
            for row in range(num_local):
                w[row] = expert_payload(layer, int(old_map[layer][ep_rank * num_local + row]), t, shape, dtype)
            tensors.append(w)
        layers.append(tensors)
    return layers


def check_weights(new_map, weights, ep_rank, ep_size):
    num_local = new_map.shape[1] // ep_size
    for layer, tensors in enumerate(weights):
        for t, (shape, dtype) in enumerate(SHAPES):
            for row in range(num_local):
                e = int(new_map[layer][ep_rank * num_local + row])
                got = np.asarray(tensors[t][row])
                assert np.array_equal(got, expert_payload(layer, e, t, shape, dtype)), (layer, t, row, e)


def maps(layers=3, experts=16, ranks=4, slots=24, seed=0):
    """An old map (vLLM's initial one, shuffled) and the default policy's new one for a skewed load."""
    import eplb

    rng = np.random.default_rng(seed)
    old = np.stack([rng.permutation(np.arange(slots) % experts) for _ in range(layers)])
    load = rng.zipf(1.5, size=(layers, experts)).astype(np.float64)
    new, _, _ = eplb.rebalance(np.minimum(load, 1e6), slots, 4, 1, ranks, old=old)
    return old, new

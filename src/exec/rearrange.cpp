#include "eplb/exec/rearrange.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "util/fail.hpp"

namespace eplb::exec {

std::size_t model_shape::expert_bytes() const {
  std::size_t n = 0;
  for (const auto& t : bundle) n += t.bytes_per_expert;
  return n;
}

void model_shape::validate() const {
  if (layers <= 0) fail(errc::invalid_argument, "model.layers: must be > 0, got {}", layers);
  if (num_logical <= 0) fail(errc::invalid_argument, "model.num_logical: must be > 0, got {}", num_logical);
  if (num_ranks <= 0) fail(errc::invalid_argument, "model.num_ranks: must be > 0, got {}", num_ranks);
  if (num_physical < num_logical || num_physical % num_ranks != 0) {
    fail(errc::invalid_argument, "model.num_physical: {} must be >= {} experts and divisible by {} ranks", num_physical,
         num_logical, num_ranks);
  }
  if (ranks_per_node < 0) fail(errc::invalid_argument, "model.ranks_per_node: must be >= 0, got {}", ranks_per_node);
  if (bundle.empty()) fail(errc::invalid_argument, "model.bundle: needs at least one tensor");
  for (std::size_t t = 0; t < bundle.size(); ++t) {
    if (bundle[t].bytes_per_expert == 0)
      fail(errc::invalid_argument, "model.bundle[{}] ({}): bytes_per_expert must be > 0", t, bundle[t].name);
    if (bundle[t].stride < bundle[t].bytes_per_expert) {
      fail(errc::invalid_argument, "model.bundle[{}] ({}): stride {} is smaller than bytes_per_expert {}", t,
           bundle[t].name, bundle[t].stride, bundle[t].bytes_per_expert);
    }
  }
}

std::uint64_t checksum(std::span<const std::byte> bytes) noexcept {
  // FNV-1a over 8-byte words (then the tail), with a final avalanche: fast enough to check weights.
  std::uint64_t h = 0xcbf29ce484222325ULL ^ bytes.size();
  std::size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    h = (h ^ w) * 0x100000001b3ULL;
  }
  for (; i < bytes.size(); ++i) h = (h ^ static_cast<std::uint64_t>(bytes[i])) * 0x100000001b3ULL;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h;
}

rearranger::rearranger(model_shape shape, int rank, device::device& dev, device::stream& stream,
                       comm::communicator& comm, rearrange_options opts)
    : shape_(std::move(shape)), rank_(rank), dev_(dev), stream_(stream), comm_(comm), opts_(std::move(opts)) {
  shape_.validate();
  if (comm_.size() != shape_.num_ranks || comm_.rank() != rank_) {
    fail(errc::invalid_argument, "rearranger: communicator is rank {} of {}, model says rank {} of {}", comm_.rank(),
         comm_.size(), rank_, shape_.num_ranks);
  }
  for (const auto& t : shape_.bundle) {
    offsets_.push_back(row_bytes_);
    row_bytes_ += t.bytes_per_expert;
  }
  const auto layer_rows = static_cast<std::size_t>(shape_.slots_per_rank());
  rows_ = opts_.staging_bytes == 0 ? layer_rows : std::min(layer_rows, opts_.staging_bytes / row_bytes_);
  if (rows_ == 0) {
    fail(errc::invalid_argument, "staging_bytes: {} is smaller than one expert bundle ({} bytes)", opts_.staging_bytes,
         row_bytes_);
  }
  comm_.set_stream(&stream_);
}

std::byte* rearranger::row(std::size_t r, int tensor) const {
  return staging_.data() + r * row_bytes_ + offsets_[static_cast<std::size_t>(tensor)];
}

namespace {

// Everything rearrange_layer() needs to hold before anything moves: maps, row and weights that fit
// the model. A violation is an error naming what does not fit; nothing has changed yet.
void check_layer_inputs(const model_shape& shape, int layer, const rank_weights& w, const placement& maps,
                        std::span<const expert_id> new_row) {
  if (maps.layers() != shape.layers || maps.num_physical() != shape.num_physical ||
      maps.num_ranks() != shape.num_ranks) {
    fail(errc::invalid_argument,
         "rearrange_layer: maps are {} layers of {} slots over {} ranks, the model {} of {} over {}", maps.layers(),
         maps.num_physical(), maps.num_ranks(), shape.layers, shape.num_physical, shape.num_ranks);
  }
  if (maps.num_logical() != shape.num_logical) {
    fail(errc::invalid_argument, "rearrange_layer: maps have {} logical experts, the model {}", maps.num_logical(),
         shape.num_logical);
  }
  if (layer < 0 || layer >= shape.layers) {
    fail(errc::invalid_argument, "rearrange_layer: layer {} out of range 0..{}", layer, shape.layers - 1);
  }
  if (new_row.size() != static_cast<std::size_t>(shape.num_physical)) {
    fail(errc::invalid_map, "new phy2log[{}]: has {} slots, expected {}", layer, new_row.size(), shape.num_physical);
  }
  validate_phy2log_row(new_row, shape.num_logical, layer, "new phy2log");
  const auto l = static_cast<std::size_t>(layer);
  if (w.base.size() != static_cast<std::size_t>(shape.layers) || w.base[l].size() != shape.bundle.size()) {
    fail(errc::invalid_argument, "rearrange_layer: weights describe {} layers, the model {} layers of {} tensors",
         w.base.size(), shape.layers, shape.bundle.size());
  }
  for (std::size_t t = 0; t < shape.bundle.size(); ++t) {
    if (w.base[l][t] == nullptr) {
      fail(errc::invalid_argument, "rearrange_layer: weights[{}][{}] ({}) is null", layer, t, shape.bundle[t].name);
    }
  }
}

}  // namespace

layer_stats rearranger::rearrange_layer(int layer, const rank_weights& w, placement& maps,
                                        std::span<const expert_id> new_row) {
  check_layer_inputs(shape_, layer, w, maps, new_row);
  const std::vector<expert_id> old_row(maps.phy2log(layer).begin(), maps.phy2log(layer).end());
  layer_stats stats;
  try {
    stats = move(layer, w, old_row, new_row);
  } catch (const error& e) {
    fail(e.code(), "layer {}: {}", layer, e.what());
  }
  maps.set_layer(layer, new_row);
  if (opts_.verify) verify_layer(layer, w, maps, opts_.verify);
  return stats;
}

std::vector<layer_stats> rearranger::rearrange(const rank_weights& w, placement& maps,
                                               const matrix<expert_id>& new_map) {
  if (new_map.rows() != static_cast<std::size_t>(shape_.layers)) {
    fail(errc::invalid_map, "new phy2log: has {} layers, the model {}", new_map.rows(), shape_.layers);
  }
  // The whole new map first: a bad later layer must not leave earlier layers moved.
  for (int l = 0; l < shape_.layers; ++l) {
    check_layer_inputs(shape_, l, w, maps, new_map.row(static_cast<std::size_t>(l)));
  }
  std::vector<layer_stats> out;
  for (int l = 0; l < shape_.layers; ++l)
    out.push_back(rearrange_layer(l, w, maps, new_map.row(static_cast<std::size_t>(l))));
  return out;
}

layer_stats rearranger::move(int layer, const rank_weights& w, std::span<const expert_id> old_row,
                             std::span<const expert_id> new_row) {
  const auto start = std::chrono::steady_clock::now();
  const auto p = plan_layer(old_row, new_row, shape_.num_ranks, rank_);
  layer_stats stats;
  stats.layer = layer;
  if (p.is_noop()) return stats;
  const auto chunks = plan_chunks(old_row, new_row, shape_.num_ranks, shape_.num_logical, rows_, layer);
  if (staging_.data() == nullptr) {  // allocated on first use: the async path stages elsewhere
    const bool any_device = std::any_of(shape_.bundle.begin(), shape_.bundle.end(),
                                        [](const auto& t) { return t.memory == device::memory_kind::device; });
    staging_ = dev_.allocate(rows_ * row_bytes_, any_device ? device::memory_kind::device : device::memory_kind::host);
  }
  stats.chunks = static_cast<int>(chunks.ranges.size());
  const int tensors = static_cast<int>(shape_.bundle.size());
  const auto eb = shape_.expert_bytes();
  const int rpn = shape_.ranks_per_node > 0 ? shape_.ranks_per_node : shape_.num_ranks;
  const auto account = [&](int peer, std::uint64_t bytes) {
    (peer / rpn == rank_ / rpn ? stats.bytes_same_node : stats.bytes_cross_node) += bytes;
  };

  // Staging rows in use: local slot -> row, and the expert after whose chunk each write may happen
  // (a slot still read as a source is overwritten only once its old expert's chunk is done).
  std::vector<int> row_of(static_cast<std::size_t>(p.slots), -1);
  std::vector<std::size_t> free_rows(rows_);
  std::iota(free_rows.rbegin(), free_rows.rend(), 0);
  struct pending_write {
    int slot;         // live slot to write
    int from_slot;    // the staged slot whose row holds its bytes
    int ready_after;  // position in the chunk order after which the write may happen
  };
  std::vector<pending_write> writes;
  for (int s = 0; s < p.slots; ++s) {
    if (!p.from_local[s] && !p.primary[s] && p.primary_of[s] < 0) continue;  // nothing to write
    int ready = chunks.position[static_cast<std::size_t>(p.new_local[s])];
    if (const expert_id x = p.read_until(s); x >= 0)
      ready = std::max(ready, chunks.position[static_cast<std::size_t>(x)]);
    if (p.from_local[s] || p.primary[s]) writes.push_back({s, s, ready});
    if (p.primary_of[s] >= 0) writes.push_back({s, p.primary_of[s], ready});
  }

  // Coalescing (one chunk only): a pair is packed when both ends see the same bytes under the cap.
  const auto n = static_cast<std::size_t>(shape_.num_ranks);
  std::vector<std::size_t> send_bytes(n), recv_bytes(n);
  for (const auto& s : p.sends) send_bytes[static_cast<std::size_t>(s.peer)] += eb;
  for (const auto& r : p.recvs) recv_bytes[static_cast<std::size_t>(r.peer)] += eb;
  std::vector<char> pack_send(n), pack_recv(n);
  if (opts_.coalesce && chunks.ranges.size() == 1 && n > 1) {
    const std::size_t cap = opts_.pack_bytes > 0 ? opts_.pack_bytes : layer_area_bytes();
    const auto worth = [&](std::size_t bytes) { return bytes <= cap && (bytes / eb) * shape_.bundle.size() >= 2; };
    for (std::size_t q = 0; q < n; ++q) {
      pack_send[q] = worth(send_bytes[q]);
      pack_recv[q] = worth(recv_bytes[q]);
    }
  }
  // Rows of a packed peer's receives are consecutive (fresh rows come off the stack in order).
  std::vector<std::pair<std::size_t, std::size_t>> recv_rows(n);  // first row, count
  for (std::size_t q = 0; q < n; ++q) {
    if (!pack_recv[q]) continue;
    recv_rows[q].first = free_rows.back();
    for (const auto& r : p.recvs) {
      if (static_cast<std::size_t>(r.peer) != q) continue;
      row_of[static_cast<std::size_t>(r.slot)] = static_cast<int>(free_rows.back());
      free_rows.pop_back();
      ++recv_rows[q].second;
    }
  }
  std::vector<std::size_t> pack_at(n);  // offset of each packed peer's message in pack_
  std::size_t pack_total = 0;
  for (std::size_t q = 0; q < n; ++q) {
    pack_at[q] = pack_total;
    if (pack_send[q]) pack_total += send_bytes[q];
  }
  if (pack_total > pack_.size()) pack_ = dev_.allocate(pack_total, staging_.kind());

  for (std::size_t c = 0; c < chunks.ranges.size(); ++c) {
    const auto [lo, hi] = chunks.ranges[c];
    const auto in_chunk = [&](expert_id e) {
      const int pos = chunks.position[static_cast<std::size_t>(e)];
      return pos >= lo && pos < hi;
    };
    for (int s : p.buffer_slots()) {
      if (!in_chunk(p.new_local[s]) || row_of[static_cast<std::size_t>(s)] >= 0) continue;
      if (free_rows.empty())
        fail(errc::internal, "staging rows exhausted in chunk {} (plan_chunks broke its promise)", c);
      row_of[static_cast<std::size_t>(s)] = static_cast<int>(free_rows.back());
      free_rows.pop_back();
      if (p.from_local[s]) {
        for (int t = 0; t < tensors; ++t) {
          stream_.copy(row(static_cast<std::size_t>(row_of[s]), t), w.slot(shape_, layer, t, p.local_source[s]),
                       shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert);
        }
        stats.bytes_copied_locally += eb;
      }
    }
    for (std::size_t q = 0; q < n; ++q) {
      if (!pack_recv[q]) continue;
      comm_.add_recv({row(recv_rows[q].first, 0), recv_rows[q].second * row_bytes_}, static_cast<int>(q));
      ++stats.messages;
    }
    for (const auto& r : p.recvs) {
      if (!in_chunk(r.expert)) continue;
      stats.bytes_received += eb;
      account(r.peer, eb);
      if (pack_recv[static_cast<std::size_t>(r.peer)]) continue;
      for (int t = 0; t < tensors; ++t) {
        comm_.add_recv({row(static_cast<std::size_t>(row_of[static_cast<std::size_t>(r.slot)]), t),
                        shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert},
                       r.peer);
        ++stats.messages;
      }
    }
    std::vector<std::size_t> cursor = pack_at;
    for (const auto& s : p.sends) {
      if (!in_chunk(s.expert)) continue;
      stats.bytes_sent += eb;
      account(s.peer, eb);
      const auto q = static_cast<std::size_t>(s.peer);
      for (int t = 0; t < tensors; ++t) {
        const std::byte* src = w.slot(shape_, layer, t, s.slot);
        const auto bytes = shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert;
        if (pack_send[q]) {
          stream_.copy(pack_.data() + cursor[q], src, bytes);
          cursor[q] += bytes;
        } else {
          comm_.add_send({src, bytes}, s.peer);
          ++stats.messages;
        }
      }
    }
    for (std::size_t q = 0; q < n; ++q) {
      if (!pack_send[q]) continue;
      comm_.add_send({pack_.data() + pack_at[q], send_bytes[q]}, static_cast<int>(q));
      ++stats.messages;
    }
    try {
      comm_.execute();
    } catch (const error& e) {
      if (c == 0) throw;
      fail(e.code(), "failed in chunk {} of {} after earlier chunks were written: the layer is partly moved ({})",
           c + 1, chunks.ranges.size(), e.what());
    }
    // Writes whose expert and whose slot's old expert are both done; then free rows no write needs.
    std::erase_if(writes, [&](const pending_write& wr) {
      if (wr.ready_after >= hi) return false;
      const auto r = static_cast<std::size_t>(row_of[static_cast<std::size_t>(wr.from_slot)]);
      for (int t = 0; t < tensors; ++t) {
        stream_.copy(w.slot(shape_, layer, t, wr.slot), row(r, t),
                     shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert);
      }
      if (wr.slot != wr.from_slot) stats.bytes_copied_locally += eb;
      return true;
    });
    for (int s : p.buffer_slots()) {
      auto& r = row_of[static_cast<std::size_t>(s)];
      if (r < 0) continue;
      const bool needed = std::any_of(writes.begin(), writes.end(), [&](const auto& wr) { return wr.from_slot == s; });
      if (!needed) {
        free_rows.push_back(static_cast<std::size_t>(r));
        r = -2;  // released for good
      }
    }
  }
  if (!writes.empty()) fail(errc::internal, "{} writes left after the last chunk", writes.size());
  // Surface any device error before the maps commit.
  stream_.synchronize(opts_.timeout);
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

std::size_t rearranger::layer_area_bytes() const noexcept {
  return row_bytes_ * static_cast<std::size_t>(shape_.slots_per_rank());
}

staged_layer rearranger::queue_layer(int layer, const rank_weights& w, std::span<const expert_id> old_row,
                                     std::span<const expert_id> new_row, std::byte* area) {
  const auto p = plan_layer(old_row, new_row, shape_.num_ranks, rank_);
  staged_layer out;
  out.layer = layer;
  out.stats.layer = layer;
  out.stats.chunks = 1;
  out.new_row.assign(new_row.begin(), new_row.end());
  const int tensors = static_cast<int>(shape_.bundle.size());
  const auto eb = shape_.expert_bytes();
  const int rpn = shape_.ranks_per_node > 0 ? shape_.ranks_per_node : shape_.num_ranks;
  const auto at = [&](int slot, int t) {
    return area + static_cast<std::size_t>(slot) * row_bytes_ + offsets_[static_cast<std::size_t>(t)];
  };
  const auto bytes = [&](int t) { return shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert; };
  // The staging row of a slot is the slot's own index: a whole layer always fits.
  for (int s : p.buffer_slots()) {
    if (p.from_local[static_cast<std::size_t>(s)]) {
      for (int t = 0; t < tensors; ++t)
        stream_.copy(at(s, t), w.slot(shape_, layer, t, p.local_source[static_cast<std::size_t>(s)]), bytes(t));
      out.stats.bytes_copied_locally += eb;
    }
    out.writes.emplace_back(s, s);
  }
  for (int s = 0; s < p.slots; ++s) {
    if (p.primary_of[static_cast<std::size_t>(s)] >= 0) {
      out.writes.emplace_back(s, p.primary_of[static_cast<std::size_t>(s)]);
      out.stats.bytes_copied_locally += eb;
    }
  }
  for (const auto& r : p.recvs) {
    for (int t = 0; t < tensors; ++t) comm_.add_recv({at(r.slot, t), bytes(t)}, r.peer);
    out.stats.messages += tensors;
    out.stats.bytes_received += eb;
    (r.peer / rpn == rank_ / rpn ? out.stats.bytes_same_node : out.stats.bytes_cross_node) += eb;
  }
  for (const auto& snd : p.sends) {
    for (int t = 0; t < tensors; ++t) comm_.add_send({w.slot(shape_, layer, t, snd.slot), bytes(t)}, snd.peer);
    out.stats.messages += tensors;
    out.stats.bytes_sent += eb;
    (snd.peer / rpn == rank_ / rpn ? out.stats.bytes_same_node : out.stats.bytes_cross_node) += eb;
  }
  return out;
}

void rearranger::commit_layer(const staged_layer& staged, const rank_weights& w, const std::byte* area,
                              device::stream& s) const {
  for (const auto& [slot, row] : staged.writes) {
    for (int t = 0; t < static_cast<int>(shape_.bundle.size()); ++t) {
      s.copy(w.slot(shape_, staged.layer, t, slot),
             area + static_cast<std::size_t>(row) * row_bytes_ + offsets_[static_cast<std::size_t>(t)],
             shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert);
    }
  }
}

void rearranger::verify_layer(int layer, const rank_weights& w, const placement& maps, const checksum_fn& expected) {
  const auto row_map = maps.phy2log(layer);
  const int base = rank_ * shape_.slots_per_rank();
  std::size_t largest = 0;
  for (const auto& t : shape_.bundle) largest = std::max(largest, t.bytes_per_expert);
  auto host = dev_.allocate(largest, device::memory_kind::pinned);
  for (int s = 0; s < shape_.slots_per_rank(); ++s) {
    const expert_id e = row_map[base + s];
    if (e < 0) continue;
    for (int t = 0; t < static_cast<int>(shape_.bundle.size()); ++t) {
      const auto bytes = shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert;
      stream_.copy(host.data(), w.slot(shape_, layer, t, s), bytes);
      stream_.synchronize(opts_.timeout);
      const auto have = checksum({host.data(), bytes});
      const auto want = expected(layer, e, t);
      if (have != want) {
        fail(errc::verification_failed,
             "layer {} rank {} slot {} tensor {} ({}): checksum {:016x}, expert {} should give {:016x}", layer, rank_,
             s, t, shape_.bundle[static_cast<std::size_t>(t)].name, have, e, want);
      }
    }
  }
}

}  // namespace eplb::exec

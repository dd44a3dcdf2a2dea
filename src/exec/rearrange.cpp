#include "eplb/exec/rearrange.hpp"

#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "util/deadline.hpp"
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
    : shape_(std::move(shape)), rank_(rank), dev_(dev), stream_(stream), comm_(&comm), opts_(std::move(opts)) {
  shape_.validate();
  check_communicator(comm);
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
  // Registered transfers must move between registered memory at both ends (NCCL leaves a mix
  // undefined), so every message is packed, which needs a layer in one chunk.
  if (opts_.register_buffers && (!opts_.coalesce || rows_ < layer_rows)) {
    fail(errc::invalid_argument,
         "register_buffers needs coalesce and a staging cap of at least one layer of this rank's slots ({} bytes), "
         "got coalesce={} and staging_bytes={}",
         layer_rows * row_bytes_, opts_.coalesce, opts_.staging_bytes);
  }
  comm_->set_stream(&stream_);
}

rearranger::~rearranger() {
  // Registrations end first, while their communicator exists; the memory outlives queued work.
  staging_reg_ = {};
  pack_reg_ = {};
  retire(std::move(staging_), false);
  retire(std::move(pack_), false);
  for (auto& r : retired_) {
    r.reg = {};
    retire(std::move(r.memory), false);
  }
}

// Hands `b` to the device, to be freed once this rearranger's streams have passed the work queued
// on them so far. With `wait`, first waits (at most the timeout) for that: normally it has long
// happened and `b` is freed at once; only after a timed-out wait does it stay for longer.
void rearranger::retire(device::buffer b, bool wait) noexcept {
  if (b.data() == nullptr) return;
  std::vector<device::event> after;
  try {
    after.push_back(stream_.record());
    if (copies_) after.push_back(copies_->record());
  } catch (...) {
    device::keep_for_good(std::move(b));  // a stream that cannot record may still run what it holds
    return;
  }
  const auto deadline = deadline_after(opts_.timeout);
  for (const auto& e : after) {
    if (!wait) break;
    try {
      while (!e.wait_for(std::chrono::milliseconds(1)) && std::chrono::steady_clock::now() < deadline) continue;
    } catch (...) {  // NOLINT(bugprone-empty-catch): failed work has ended too
    }
  }
  dev_.release_after(std::move(b), std::move(after));
}

void rearranger::check_communicator(const comm::communicator& c) const {
  if (c.size() != shape_.num_ranks || c.rank() != rank_) {
    fail(errc::invalid_argument, "rearranger: communicator is rank {} of {}, model says rank {} of {}", c.rank(),
         c.size(), rank_, shape_.num_ranks);
  }
}

void rearranger::set_communicator(comm::communicator& c) {
  check_communicator(c);
  // Registered with the new communicator first: if that throws, nothing has changed.
  comm::registration staging_reg, pack_reg;
  if (opts_.register_buffers) {
    if (staging_.size() > 0) staging_reg = c.register_memory(staging_.span());
    if (pack_.size() > 0) pack_reg = c.register_memory(pack_.span());
  }
  staging_reg_ = std::move(staging_reg);  // ends the old registrations while their communicator exists
  pack_reg_ = std::move(pack_reg);
  for (auto& r : retired_) {
    r.reg = {};
    retire(std::move(r.memory), false);  // a failed batch's copies may still be queued
  }
  retired_.clear();
  c.set_stream(&stream_);
  comm_ = &c;
}

// Grows a staging or packing buffer; an unregistered one goes first (once the streams have passed
// its last use), so that both never need to fit at once. Registered buffers are made at their
// largest expected size and, should they grow anyway (a rank can send one expert to several
// peers), at least double; the old one stays allocated and registered until the communicator
// changes: NCCL keeps peers' mappings of a registration by address, and a buffer that reused a
// freed registered address was seen to fail its registration on one rank only, corrupting
// transfers.
void rearranger::reserve(device::buffer& b, comm::registration& reg, std::size_t bytes, std::size_t largest) {
  if (b.size() >= bytes) return;
  if (!opts_.register_buffers) {
    retire(std::move(b), true);
    b = dev_.allocate(bytes, staging_kind());
    return;
  }
  const std::size_t size = std::max({bytes, largest, 2 * b.size()});
  auto m = staging_kind() == device::memory_kind::device ? comm_->allocate_registered(size) : comm::registered_memory{};
  if (m.memory.size() == 0) {
    auto memory = dev_.allocate(size, staging_kind());
    auto r = comm_->register_memory(memory.span());
    m = comm::registered_memory(std::move(memory), std::move(r));
  }
  if (b.size() > 0) retired_.emplace_back(std::move(b), std::move(reg));
  b = std::move(m.memory);
  reg = std::move(m.reg);
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

namespace {

std::vector<expert_id> missing_experts(std::span<const expert_id> row, int num_logical) {
  std::vector<char> seen(static_cast<std::size_t>(num_logical));
  for (const expert_id e : row) {
    if (e >= 0) seen[static_cast<std::size_t>(e)] = 1;
  }
  std::vector<expert_id> lost;
  for (int e = 0; e < num_logical; ++e) {
    if (!seen[static_cast<std::size_t>(e)]) lost.push_back(e);
  }
  return lost;
}

}  // namespace

layer_stats rearranger::rearrange_layer(int layer, const rank_weights& w, placement& maps,
                                        std::span<const expert_id> new_row) {
  check_layer_inputs(shape_, layer, w, maps, new_row);
  const std::vector<expert_id> old_row(maps.phy2log(layer).begin(), maps.phy2log(layer).end());
  layer_stats stats;
  int chunks_written = 0;
  try {
    stats = move(layer, w, old_row, new_row, chunks_written);
  } catch (const error& e) {
    if (chunks_written > 0 && opts_.commit_gate) {
      // Every rank stopped after the same chunks: the maps say which slots hold which expert.
      const auto chunks = plan_chunks(old_row, new_row, shape_.num_ranks, shape_.num_logical, rows_, layer);
      const auto row = row_after_chunks(old_row, new_row, shape_.num_ranks, chunks, chunks_written);
      if (const auto lost = missing_experts(row, shape_.num_logical); !lost.empty()) {
        // Known gap: a held staging row was the only copy (see README, "Faults").
        fail(e.code(),
             "layer {}: {} (stopped on every rank after {} of {} chunks; experts {} were only in staging "
             "rows, so the layer keeps its old maps while some of its slots hold new bytes)",
             layer, e.what(), chunks_written, chunks.ranges.size(), fmt::join(lost, ","));
      }
      maps.set_layer(layer, row);
      fail(e.code(), "layer {}: {} (stopped on every rank after {} of {} chunks; the maps name what each slot holds)",
           layer, e.what(), chunks_written, chunks.ranges.size());
    }
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
  if (pipelines()) return rearrange_pipelined(w, maps, new_map);
  std::vector<layer_stats> out;
  for (int l = 0; l < shape_.layers; ++l)
    out.push_back(rearrange_layer(l, w, maps, new_map.row(static_cast<std::size_t>(l))));
  return out;
}

namespace {

// Copies staging rows into live slots, `writes` being (slot, row) pairs: each run of consecutive
// slots from consecutive rows is one strided copy per tensor (few device calls per layer).
void write_rows(const model_shape& shape, std::span<const std::size_t> offsets, std::size_t row_bytes, int layer,
                const rank_weights& w, std::span<const std::pair<int, int>> writes, const std::byte* area,
                device::stream& s) {
  for (std::size_t i = 0; i < writes.size();) {
    std::size_t n = 1;
    while (i + n < writes.size() && writes[i + n].first == writes[i].first + static_cast<int>(n) &&
           writes[i + n].second == writes[i].second + static_cast<int>(n)) {
      ++n;
    }
    for (std::size_t t = 0; t < shape.bundle.size(); ++t) {
      s.copy_2d(w.slot(shape, layer, static_cast<int>(t), writes[i].first), shape.bundle[t].stride,
                area + static_cast<std::size_t>(writes[i].second) * row_bytes + offsets[t], row_bytes,
                shape.bundle[t].bytes_per_expert, n);
    }
    i += n;
  }
}

// One layer's moves on one rank, posted in chunks (serial path) or whole (pipelined path): staging
// rows per local slot, which peers' messages are packed, and the statistics.
class layer_mover {
 public:
  layer_mover(const model_shape& shape, std::span<const std::size_t> offsets, std::size_t row_bytes, int rank,
              int layer, const rank_weights& w, layer_plan plan, std::size_t rows, std::size_t pack_cap, bool pack_all)
      : shape_(shape),
        offsets_(offsets),
        row_bytes_(row_bytes),
        rank_(rank),
        layer_(layer),
        w_(w),
        p_(std::move(plan)),
        n_(static_cast<std::size_t>(shape.num_ranks)),
        eb_(shape.expert_bytes()) {
    stats.layer = layer;
    row_of.assign(static_cast<std::size_t>(p_.slots), -1);
    free_rows.resize(rows);
    std::iota(free_rows.rbegin(), free_rows.rend(), 0);
    send_bytes_.resize(n_);
    recv_bytes_.resize(n_);
    for (const auto& s : p_.sends) send_bytes_[static_cast<std::size_t>(s.peer)] += eb_;
    for (const auto& r : p_.recvs) recv_bytes_[static_cast<std::size_t>(r.peer)] += eb_;
    // A pair is packed when both ends see the same bytes under the cap (0 = off), or always with
    // pack_all (registered buffers: every message then moves between registered memory).
    pack_send_.resize(n_);
    pack_recv_.resize(n_);
    const auto worth = [&](std::size_t bytes) {
      if (pack_all) return bytes > 0;
      return pack_cap > 0 && bytes <= pack_cap && (bytes / eb_) * shape_.bundle.size() >= 2;
    };
    for (std::size_t q = 0; q < n_; ++q) {
      pack_send_[q] = worth(send_bytes_[q]);
      pack_recv_[q] = worth(recv_bytes_[q]);
      pack_at_.push_back(pack_total_);
      if (pack_send_[q]) pack_total_ += send_bytes_[q];
    }
    // Receives of a packed peer land in consecutive rows (fresh rows come off the stack in order).
    recv_rows_.resize(n_);
    for (std::size_t q = 0; q < n_; ++q) {
      if (!pack_recv_[q]) continue;
      recv_rows_[q].first = free_rows.back();
      for (const auto& r : p_.recvs) {
        if (static_cast<std::size_t>(r.peer) != q) continue;
        row_of[static_cast<std::size_t>(r.slot)] = static_cast<int>(free_rows.back());
        free_rows.pop_back();
        ++recv_rows_[q].second;
      }
    }
  }

  [[nodiscard]] const layer_plan& plan() const noexcept { return p_; }
  [[nodiscard]] std::size_t pack_bytes() const noexcept { return pack_total_; }
  [[nodiscard]] std::size_t rows_needed() const noexcept { return p_.buffer_slots().size(); }

  [[nodiscard]] std::byte* row(std::byte* area, int r, int tensor) const {
    return area + static_cast<std::size_t>(r) * row_bytes_ + offsets_[static_cast<std::size_t>(tensor)];
  }
  [[nodiscard]] std::byte* slot(int tensor, int s) const { return w_.slot(shape_, layer_, tensor, s); }
  [[nodiscard]] std::size_t bytes(int tensor) const {
    return shape_.bundle[static_cast<std::size_t>(tensor)].bytes_per_expert;
  }
  [[nodiscard]] int tensors() const noexcept { return static_cast<int>(shape_.bundle.size()); }

  // Rows for the chunk's buffer slots (local copies on `copies`), then the chunk's receives and
  // sends on `comm`; sends to packed peers are first packed into `pack` on `copies`.
  template <typename InChunk>
  void post(const InChunk& in_chunk, std::byte* area, std::byte* pack, device::stream& copies,
            comm::communicator& comm) {
    for (int s : p_.buffer_slots()) {
      auto& r = row_of[static_cast<std::size_t>(s)];
      if (!in_chunk(p_.new_local[s]) || r >= 0) continue;
      if (free_rows.empty()) fail(errc::internal, "staging rows exhausted (plan_chunks broke its promise)");
      r = static_cast<int>(free_rows.back());
      free_rows.pop_back();
      if (p_.from_local[s]) {
        for (int t = 0; t < tensors(); ++t) copies.copy(row(area, r, t), slot(t, p_.local_source[s]), bytes(t));
        stats.bytes_copied_locally += eb_;
      }
    }
    for (std::size_t q = 0; q < n_; ++q) {
      if (!pack_recv_[q] || recv_rows_[q].second == 0 || !in_chunk(first_recv(q))) continue;
      comm.add_recv({row(area, static_cast<int>(recv_rows_[q].first), 0), recv_rows_[q].second * row_bytes_},
                    static_cast<int>(q));
      ++stats.messages;
    }
    for (const auto& r : p_.recvs) {
      if (!in_chunk(r.expert)) continue;
      stats.bytes_received += eb_;
      account(r.peer);
      if (pack_recv_[static_cast<std::size_t>(r.peer)]) continue;
      for (int t = 0; t < tensors(); ++t) {
        comm.add_recv({row(area, row_of[static_cast<std::size_t>(r.slot)], t), bytes(t)}, r.peer);
        ++stats.messages;
      }
    }
    std::vector<std::size_t> cursor = pack_at_;
    std::vector<char> packed_now(n_);
    for (const auto& s : p_.sends) {
      if (!in_chunk(s.expert)) continue;
      stats.bytes_sent += eb_;
      account(s.peer);
      const auto q = static_cast<std::size_t>(s.peer);
      for (int t = 0; t < tensors(); ++t) {
        if (pack_send_[q]) {
          copies.copy(pack + cursor[q], slot(t, s.slot), bytes(t));
          cursor[q] += bytes(t);
          packed_now[q] = 1;
        } else {
          comm.add_send({slot(t, s.slot), bytes(t)}, s.peer);
          ++stats.messages;
        }
      }
    }
    for (std::size_t q = 0; q < n_; ++q) {
      if (!packed_now[q]) continue;
      comm.add_send({pack + pack_at_[q], send_bytes_[q]}, static_cast<int>(q));
      ++stats.messages;
    }
  }

  // Every changed slot from its staging row, duplicates from their primary's row (whole layer).
  void write_all(std::byte* area, device::stream& s) {
    std::vector<std::pair<int, int>> writes;
    for (int sl = 0; sl < p_.slots; ++sl) {
      const auto u = static_cast<std::size_t>(sl);
      if (p_.from_local[u] || p_.primary[u]) writes.emplace_back(sl, row_of[u]);
    }
    for (int sl = 0; sl < p_.slots; ++sl) {
      if (const int from = p_.primary_of[static_cast<std::size_t>(sl)]; from >= 0) {
        writes.emplace_back(sl, row_of[static_cast<std::size_t>(from)]);
        stats.bytes_copied_locally += eb_;
      }
    }
    write_rows(shape_, offsets_, row_bytes_, layer_, w_, writes, area, s);
  }

  layer_stats stats;
  std::vector<int> row_of;  // per local slot: its staging row (-1 none yet, -2 released)
  std::vector<std::size_t> free_rows;

 private:
  // Packing is only used for one-chunk layers, so a packed peer's receives are all in one chunk.
  expert_id first_recv(std::size_t q) const {
    for (const auto& r : p_.recvs) {
      if (static_cast<std::size_t>(r.peer) == q) return r.expert;
    }
    return -1;
  }
  void account(int peer) {
    const int rpn = shape_.ranks_per_node > 0 ? shape_.ranks_per_node : shape_.num_ranks;
    (peer / rpn == rank_ / rpn ? stats.bytes_same_node : stats.bytes_cross_node) += eb_;
  }

  const model_shape& shape_;
  std::span<const std::size_t> offsets_;
  std::size_t row_bytes_;
  int rank_;
  int layer_;
  const rank_weights& w_;
  layer_plan p_;
  std::size_t n_;
  std::size_t eb_;
  std::vector<std::size_t> send_bytes_, recv_bytes_, pack_at_;
  std::vector<char> pack_send_, pack_recv_;
  std::vector<std::pair<std::size_t, std::size_t>> recv_rows_;  // packed peers: first row, count
  std::size_t pack_total_ = 0;
};

}  // namespace

device::memory_kind rearranger::staging_kind() const {
  const bool any_device = std::any_of(shape_.bundle.begin(), shape_.bundle.end(),
                                      [](const auto& t) { return t.memory == device::memory_kind::device; });
  return any_device ? device::memory_kind::device : device::memory_kind::host;
}

std::size_t rearranger::pack_cap() const noexcept {
  if (!opts_.coalesce || shape_.num_ranks < 2) return 0;
  return opts_.pack_bytes > 0 ? opts_.pack_bytes : layer_area_bytes();
}

void rearranger::pass_gate(int layer, int chunk, std::exception_ptr failure) const {
  if (!opts_.commit_gate) {
    if (failure) std::rethrow_exception(failure);
    return;
  }
  const auto verdict = opts_.commit_gate(layer, chunk, failure);
  if (failure) std::rethrow_exception(failure);
  if (!verdict.empty()) fail(errc::peer_failure, "not written on any rank: {}", verdict);
}

// A layer that changes elsewhere but not on this rank: its batches are still voted on, since every
// rank decides each batch.
void rearranger::vote_noop_layer(int layer, std::span<const expert_id> old_row,
                                 std::span<const expert_id> new_row) const {
  if (!opts_.commit_gate || std::equal(old_row.begin(), old_row.end(), new_row.begin(), new_row.end())) return;
  const auto chunks = plan_chunks(old_row, new_row, shape_.num_ranks, shape_.num_logical, rows_, layer);
  for (std::size_t c = 0; c < chunks.ranges.size(); ++c) pass_gate(layer, static_cast<int>(c), nullptr);
}

layer_stats rearranger::move(int layer, const rank_weights& w, std::span<const expert_id> old_row,
                             std::span<const expert_id> new_row, int& chunks_written) {
  const auto start = std::chrono::steady_clock::now();
  auto p = plan_layer(old_row, new_row, shape_.num_ranks, rank_);
  if (p.is_noop()) {
    vote_noop_layer(layer, old_row, new_row);
    return layer_stats{.layer = layer};
  }
  const auto chunks = plan_chunks(old_row, new_row, shape_.num_ranks, shape_.num_logical, rows_, layer);
  const bool one_chunk = chunks.ranges.size() == 1;
  // The constructor keeps register_buffers to caps of at least one layer, which never need chunks.
  if (opts_.register_buffers && !one_chunk)
    fail(errc::internal, "layer {}: registered buffers but several chunks", layer);
  layer_mover m(shape_, offsets_, row_bytes_, rank_, layer, w, std::move(p), rows_, one_chunk ? pack_cap() : 0,
                opts_.register_buffers);
  const auto& plan = m.plan();
  // Registered buffers are made for the larger path right away (two layers where this rearranger
  // may pipeline, one within a smaller cap).
  const std::size_t areas = pipelines() ? 2 : 1;
  reserve(staging_, staging_reg_, rows_ * row_bytes_, areas * rows_ * row_bytes_);
  reserve(pack_, pack_reg_, m.pack_bytes(), areas * layer_area_bytes());
  m.stats.chunks = static_cast<int>(chunks.ranges.size());
  const auto eb = shape_.expert_bytes();

  // Each write happens after the chunk at position ready_after (see write_ready_after).
  struct pending_write {
    int slot;         // live slot to write
    int from_slot;    // the staged slot whose row holds its bytes
    int ready_after;  // position in the chunk order after which the write may happen
  };
  std::vector<pending_write> writes;
  for (int s = 0; s < plan.slots; ++s) {
    const int ready = write_ready_after(plan, chunks, s);
    if (ready < 0) continue;  // nothing to write
    if (plan.from_local[s] || plan.primary[s]) writes.push_back({s, s, ready});
    if (plan.primary_of[s] >= 0) writes.push_back({s, plan.primary_of[s], ready});
  }

  for (std::size_t c = 0; c < chunks.ranges.size(); ++c) {
    const auto [lo, hi] = chunks.ranges[c];
    const auto in_chunk = [&](expert_id e) {
      const int pos = chunks.position[static_cast<std::size_t>(e)];
      return pos >= lo && pos < hi;
    };
    std::exception_ptr failure;
    try {
      try {
        m.post(in_chunk, staging_.data(), pack_.data(), stream_, *comm_);
      } catch (...) {
        comm_->discard_pending();  // half a batch must not join the next one
        throw;
      }
      comm_->execute();
    } catch (const error& e) {
      failure = c == 0 ? std::current_exception()
                       : std::make_exception_ptr(error(
                             e.code(), fmt::format("failed in chunk {} of {} after earlier chunks were written: the "
                                                   "layer is partly moved ({})",
                                                   c + 1, chunks.ranges.size(), e.what())));
    }
    pass_gate(layer, static_cast<int>(c), failure);
    // Writes whose expert and whose slot's old expert are both done; then free rows no write needs.
    std::erase_if(writes, [&](const pending_write& wr) {
      if (wr.ready_after >= hi) return false;
      const int r = m.row_of[static_cast<std::size_t>(wr.from_slot)];
      for (int t = 0; t < m.tensors(); ++t) stream_.copy(m.slot(t, wr.slot), m.row(staging_.data(), r, t), m.bytes(t));
      if (wr.slot != wr.from_slot) m.stats.bytes_copied_locally += eb;
      return true;
    });
    chunks_written = static_cast<int>(c) + 1;
    for (int s : plan.buffer_slots()) {
      auto& r = m.row_of[static_cast<std::size_t>(s)];
      if (r < 0) continue;
      const bool needed = std::any_of(writes.begin(), writes.end(), [&](const auto& wr) { return wr.from_slot == s; });
      if (!needed) {
        m.free_rows.push_back(static_cast<std::size_t>(r));
        r = -2;  // released for good
      }
    }
  }
  if (!writes.empty()) fail(errc::internal, "{} writes left after the last chunk", writes.size());
  // Surface any device error before the maps commit.
  stream_.synchronize(opts_.timeout);
  m.stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return m.stats;
}

bool rearranger::pipelines() const noexcept {
  return opts_.pipeline && (opts_.staging_bytes == 0 || opts_.staging_bytes >= 2 * layer_area_bytes());
}

std::vector<layer_stats> rearranger::rearrange_pipelined(const rank_weights& w, placement& maps,
                                                         const matrix<expert_id>& new_map) {
  // Layer L's transfers run on the communicator's stream while the copy stream writes layer L-1's
  // staging rows into its live slots and stages layer L+1 (local copies, packing) into the other
  // area: the host only waits for transfers, never for copies. Area and pack buffer b serve layers
  // b, b+2, ...; the copy stream's order and its wait on each layer's transfers keep them apart.
  const int layers = shape_.layers;
  const auto all_rows = static_cast<std::size_t>(shape_.slots_per_rank());
  std::vector<std::unique_ptr<layer_mover>> movers(static_cast<std::size_t>(layers));
  std::size_t rows = 0, pack = 0;
  for (int l = 0; l < layers; ++l) {
    const auto old_row = maps.phy2log(l);
    auto p = plan_layer(old_row, new_map.row(static_cast<std::size_t>(l)), shape_.num_ranks, rank_);
    if (p.is_noop()) continue;
    auto& m = movers[static_cast<std::size_t>(l)];
    m = std::make_unique<layer_mover>(shape_, offsets_, row_bytes_, rank_, l, w, std::move(p), all_rows, pack_cap(),
                                      opts_.register_buffers);
    m->stats.chunks = 1;
    rows = std::max(rows, m->rows_needed());  // rows are taken in order from 0
    pack = std::max(pack, m->pack_bytes());
  }
  reserve(staging_, staging_reg_, 2 * rows * row_bytes_, 2 * rows_ * row_bytes_);
  reserve(pack_, pack_reg_, 2 * pack, 2 * layer_area_bytes());
  if (!copies_) copies_ = dev_.create_stream();
  const auto area = [&](int l) { return staging_.data() + static_cast<std::size_t>(l % 2) * rows * row_bytes_; };
  const auto pack_area = [&](int l) { return pack_.data() + static_cast<std::size_t>(l % 2) * pack; };

  std::vector<device::event> sent(static_cast<std::size_t>(layers));
  std::vector<std::chrono::steady_clock::time_point> began(static_cast<std::size_t>(layers));
  const auto submit = [&](int l) {
    auto& m = movers[static_cast<std::size_t>(l)];
    began[static_cast<std::size_t>(l)] = std::chrono::steady_clock::now();
    if (!m) return;
    try {
      m->post([](expert_id) { return true; }, area(l), pack_area(l), *copies_, *comm_);
      stream_.wait(copies_->record());  // transfers start once staged and packed
      sent[static_cast<std::size_t>(l)] = comm_->submit();
    } catch (const error& e) {
      comm_->discard_pending();  // half a batch must not join the next one
      fail(e.code(), "layer {}: {}", l, e.what());
    }
  };
  // A layer's maps change only once its slot writes have landed; by the time layer l's transfers
  // are done, layer l-1's writes usually are too, so the wait costs little.
  std::vector<device::event> written(static_cast<std::size_t>(layers));
  int confirmed = 0;
  const auto commit_through = [&](int end) {
    for (; confirmed < end; ++confirmed) {
      if (const auto& e = written[static_cast<std::size_t>(confirmed)]; e.valid()) {
        try {
          e.wait(opts_.timeout);
        } catch (const error& err) {
          fail(err.code(), "layer {}: writing its slots failed, the layer is partly written ({})", confirmed,
               err.what());
        }
      }
      maps.set_layer(confirmed, new_map.row(static_cast<std::size_t>(confirmed)));
    }
  };
  std::vector<layer_stats> out;
  int next = 0;
  try {
    copies_->wait(stream_.record());  // staging reads live slots after the caller's earlier work
    for (; next < std::min(layers, 2); ++next) submit(next);
    for (int l = 0; l < layers; ++l) {
      auto& m = movers[static_cast<std::size_t>(l)];
      if (!m) {
        try {
          vote_noop_layer(l, maps.phy2log(l), new_map.row(static_cast<std::size_t>(l)));
        } catch (const error& e) {
          fail(e.code(), "layer {}: {}", l, e.what());
        }
      }
      if (m) {
        std::exception_ptr failure;
        try {
          comm_->wait(sent[static_cast<std::size_t>(l)]);
        } catch (...) {
          failure = std::current_exception();
        }
        try {
          pass_gate(l, 0, failure);
        } catch (const error& e) {
          fail(e.code(), "layer {}: {}", l, e.what());
        }
        commit_through(l);
        const auto& done = sent[static_cast<std::size_t>(l)];
        // Stream-ordered: the copy stream waits for the transfers; host-complete: they are in place.
        copies_->wait(done.valid() && comm_->caps().stream_ordered ? done : stream_.record());
        m->write_all(area(l), *copies_);
        written[static_cast<std::size_t>(l)] = copies_->record();
      }
      layer_stats st = m ? m->stats : layer_stats{.layer = l};
      st.seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - began[static_cast<std::size_t>(l)]).count();
      out.push_back(st);
      m.reset();
      if (next < layers) submit(next++);
    }
    commit_through(layers);
    stream_.synchronize(opts_.timeout);
  } catch (...) {
    // Batches still in flight only touch staging; wait for them so the buffers can be reused.
    for (int l = static_cast<int>(out.size()); l < next; ++l) {
      try {
        if (movers[static_cast<std::size_t>(l)]) comm_->wait(sent[static_cast<std::size_t>(l)]);
      } catch (...) {  // NOLINT(bugprone-empty-catch): the first failure is the one reported
      }
    }
    // Layers whose writes are queued commit once those have landed; if the copy stream failed,
    // their maps stay old and commit_through's error has named the partly written layer.
    bool landed = true;
    try {
      copies_->synchronize(opts_.timeout);
    } catch (...) {
      landed = false;
    }
    if (landed) {
      for (; confirmed < static_cast<int>(out.size()); ++confirmed) {
        maps.set_layer(confirmed, new_map.row(static_cast<std::size_t>(confirmed)));
      }
    }
    throw;
  }
  if (opts_.verify) {
    for (int l = 0; l < layers; ++l) verify_layer(l, w, maps, opts_.verify);
  }
  return out;
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
    for (int t = 0; t < tensors; ++t) comm_->add_recv({at(r.slot, t), bytes(t)}, r.peer);
    out.stats.messages += tensors;
    out.stats.bytes_received += eb;
    (r.peer / rpn == rank_ / rpn ? out.stats.bytes_same_node : out.stats.bytes_cross_node) += eb;
  }
  for (const auto& snd : p.sends) {
    for (int t = 0; t < tensors; ++t) comm_->add_send({w.slot(shape_, layer, t, snd.slot), bytes(t)}, snd.peer);
    out.stats.messages += tensors;
    out.stats.bytes_sent += eb;
    (snd.peer / rpn == rank_ / rpn ? out.stats.bytes_same_node : out.stats.bytes_cross_node) += eb;
  }
  return out;
}

void rearranger::commit_layer(const staged_layer& staged, const rank_weights& w, const std::byte* area,
                              device::stream& s) const {
  write_rows(shape_, offsets_, row_bytes_, staged.layer, w, staged.writes, area, s);
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
      try {
        stream_.synchronize(opts_.timeout);
      } catch (...) {
        dev_.release_after(std::move(host), stream_);  // a timed-out wait leaves the copy into it queued
        throw;
      }
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

// The rearranger's buffers and communicator, the per-layer and whole-map entry points, the serial
// (chunked) stager and the async building blocks; the moves themselves are layer_transfer's, the
// pipelined stager is in pipeline.cpp.
#include "eplb/exec/rearrange.hpp"

#include <algorithm>

#include "exec/layer_transfer.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::exec {

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
  retire(std::move(queue_pack_), false);
  retire(std::move(verify_scratch_), false);
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
  if (reserved_) overflows_.fetch_add(1, std::memory_order_relaxed);
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

// The sizes the move paths ask reserve() for at most (registered buffers: their "largest"), so
// that, made now, no later move allocates; packing gets as many bytes as staging.
device::memory_use rearranger::reserve_memory(bool for_queue) {
  if (!for_queue) {
    const std::size_t bytes = (pipelines() ? 2 : 1) * rows_ * row_bytes_;
    reserve(staging_, staging_reg_, bytes, bytes);
    if (pack_cap() > 0) reserve(pack_, pack_reg_, bytes, bytes);
  } else if (pack_cap() > 0 && queue_pack_.size() < layer_area_bytes()) {
    retire(std::move(queue_pack_), true);
    queue_pack_ = dev_.allocate(layer_area_bytes(), staging_kind());
  }
  if (opts_.verify && verify_scratch_.size() < largest_tensor()) {
    retire(std::move(verify_scratch_), true);
    verify_scratch_ = dev_.allocate(largest_tensor(), device::memory_kind::pinned);
  }
  reserved_ = true;
  device::memory_use use;
  use.add(staging_kind(), staging_.size() + pack_.size() + queue_pack_.size());
  use.add(device::memory_kind::pinned, verify_scratch_.size());
  return use;
}

std::size_t rearranger::largest_tensor() const noexcept {
  std::size_t largest = 0;
  for (const auto& t : shape_.bundle) largest = std::max(largest, t.bytes_per_expert);
  return largest;
}

// How a layer's messages are packed: pairs within the cap, and with pack_within_staging (unless
// every pair is: registered buffers) no more of them than fit the packing reserve_memory()
// reserves per layer (this rank's staging rows' worth), so that no layer needs more.
pack_rule rearranger::packing(std::span<const expert_id> old_row, std::span<const expert_id> new_row, std::size_t cap,
                              bool all, std::vector<std::size_t>& pairs) const {
  pack_rule rule{.cap = cap, .all = all};
  if (all || cap == 0 || !opts_.pack_within_staging) return rule;
  pairs = pair_sends(old_row, new_row, shape_.num_ranks);
  rule.budget = rows_ * row_bytes_;
  rule.pairs = &pairs;
  return rule;
}

row_layout rearranger::layout() const noexcept {
  return {.shape = &shape_, .offsets = offsets_, .row_bytes = row_bytes_, .rank = rank_};
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
  validate_phy2log_row(new_row, shape.num_logical, layer, "new phy2log", maps.allows_masked());
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
  comm_->set_stream(&stream_);  // as in rearrange()
  const std::vector<expert_id> old_row(maps.phy2log(layer).begin(), maps.phy2log(layer).end());
  layer_stats stats;
  layer_stop stop;
  try {
    stats = move(layer, w, old_row, new_row, stop);
  } catch (const error& e) {
    if (!stop.row.empty()) {
      // Every rank stopped after the same chunks and wrote back what was only in staging rows
      // (write_back_held, serial_move): the maps say which slots hold which expert, and route
      // nothing to a slot the refused batch may have written.
      maps.set_layer(layer, stop.row);
      fail(e.code(), "layer {}: {} (stopped on every rank after {} chunks; the maps name what each slot holds)", layer,
           e.what(), stop.done);
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
  // A communicator can be shared by rearrangers on different streams (an async state's side
  // stream and a rescale's move on the serving stream): each posts in its own stream's order.
  comm_->set_stream(&stream_);
  if (pipelines()) return rearrange_pipelined(w, maps, new_map);
  std::vector<layer_stats> out;
  for (int l = 0; l < shape_.layers; ++l)
    out.push_back(rearrange_layer(l, w, maps, new_map.row(static_cast<std::size_t>(l))));
  return out;
}

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
  const auto chunks = chunks_of(layer, old_row, new_row);
  for (std::size_t c = 0; c < chunks.ranges.size(); ++c) pass_gate(layer, static_cast<int>(c), nullptr);
}

layer_stats rearranger::move(int layer, const rank_weights& w, std::span<const expert_id> old_row,
                             std::span<const expert_id> new_row, layer_stop& stop) {
  const auto start = std::chrono::steady_clock::now();
  auto p = plan_layer(old_row, new_row, shape_.num_ranks, rank_);
  if (p.is_noop()) {
    vote_noop_layer(layer, old_row, new_row);
    return layer_stats{.layer = layer};
  }
  const auto chunks = chunks_of(layer, old_row, new_row);
  if (chunks.serial) return move_serial(layer, w, old_row, chunks, stop);
  const bool one_chunk = chunks.ranges.size() == 1;
  // The constructor keeps register_buffers to caps of at least one layer, which never need chunks.
  if (opts_.register_buffers && !one_chunk)
    fail(errc::internal, "layer {}: registered buffers but several chunks", layer);
  std::vector<std::size_t> pairs;
  layer_transfer m(layout(), layer, w, std::move(p), rows_,
                   packing(old_row, new_row, one_chunk ? pack_cap() : 0, opts_.register_buffers, pairs));
  m.schedule(chunks);
  // Registered buffers are made for the larger path right away (two layers where this rearranger
  // may pipeline, one within a smaller cap).
  const std::size_t areas = pipelines() ? 2 : 1;
  reserve(staging_, staging_reg_, rows_ * row_bytes_, areas * rows_ * row_bytes_);
  reserve(pack_, pack_reg_, m.pack_bytes(), areas * layer_area_bytes());
  for (std::size_t c = 0; c < chunks.ranges.size(); ++c) {
    const auto failure = post_chunk(m, chunks, c);
    try {
      pass_gate(layer, static_cast<int>(c), failure);
    } catch (...) {
      if (c > 0 && opts_.commit_gate) write_back_held(m, old_row, new_row, chunks, static_cast<int>(c), stop);
      throw;
    }
    // Writes whose expert and whose slot's old expert are both done; then free rows no write needs.
    m.write_ready(chunks.ranges[c].second, staging_.data(), stream_);
  }
  if (m.writes_left() > 0) fail(errc::internal, "{} writes left after the last chunk", m.writes_left());
  // Surface any device error before the maps commit.
  stream_.synchronize(opts_.timeout);
  m.stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return m.stats;
}

// Every rank stopped after `done` chunks: this rank writes back the staging rows that hold an
// expert's only copy (stop_after_chunks names them alike on every rank), so that the maps
// rearrange_layer() then sets name what every live slot holds. Only rows of chunks every rank
// wrote are read; the refused chunk's receives went to other rows. Should the write-back itself
// fail (a device fault on this rank), that error is the one reported.
void rearranger::write_back_held(layer_transfer& m, std::span<const expert_id> old_row,
                                 std::span<const expert_id> new_row, const chunk_plan& chunks, int done,
                                 layer_stop& stop) {
  auto s = stop_after_chunks(old_row, new_row, shape_.num_ranks, shape_.num_logical, chunks, done);
  for (const auto& r : s.repairs) {
    if (r.rank == rank_) m.write_staged(r.slot, r.staged_slot, staging_.data(), stream_);
  }
  stream_.synchronize(opts_.timeout);
  stop = {done, std::move(s.row)};
}

// How this rearranger cuts `layer` into batches, alike on every rank: with a commit gate a refused
// batch stops every rank there, so only where the stop can leave the maps true.
chunk_plan rearranger::chunks_of(int layer, std::span<const expert_id> old_row,
                                 std::span<const expert_id> new_row) const {
  return plan_chunks(old_row, new_row, shape_.num_ranks, shape_.num_logical, rows_, layer,
                     opts_.commit_gate ? cut_rule::stop_safe : cut_rule::anywhere);
}

// Stages chunk `c` of `m` and runs it as one batch; returns its failure (a later chunk's names the
// partly moved layer) for the gate to decide on.
std::exception_ptr rearranger::post_chunk(layer_transfer& m, const chunk_plan& chunks, std::size_t c) {
  const auto [lo, hi] = chunks.ranges[c];
  try {
    try {
      m.post(lo, hi, staging_.data(), pack_.data(), stream_, *comm_);
    } catch (...) {
      comm_->discard_pending();  // half a batch must not join the next one
      throw;
    }
    comm_->execute();
  } catch (const error& e) {
    if (c == 0) return std::current_exception();
    return std::make_exception_ptr(error(e.code(), fmt::format("failed in chunk {} of {} after earlier chunks were "
                                                               "written: the layer is partly moved ({})",
                                                               c + 1, chunks.ranges.size(), e.what())));
  }
  return nullptr;
}

bool rearranger::pipelines() const noexcept {
  return opts_.pipeline && (opts_.staging_bytes == 0 || opts_.staging_bytes >= 2 * layer_area_bytes());
}

std::size_t rearranger::layer_area_bytes() const noexcept {
  return row_bytes_ * static_cast<std::size_t>(shape_.slots_per_rank());
}

staged_layer rearranger::queue_layer(int layer, const rank_weights& w, std::span<const expert_id> old_row,
                                     std::span<const expert_id> new_row, std::byte* area) {
  staged_layer out;
  out.layer = layer;
  out.new_row.assign(new_row.begin(), new_row.end());
  // The area holds a whole layer. Peers are packed as on the sync path, but never as registered
  // memory: the caller's areas are not registered, and both ends of a transfer must match.
  std::vector<std::size_t> pairs;
  layer_transfer m(layout(), layer, w, plan_layer(old_row, new_row, shape_.num_ranks, rank_),
                   static_cast<std::size_t>(shape_.slots_per_rank()),
                   packing(old_row, new_row, pack_cap(), false, pairs));
  comm_->set_stream(&stream_);  // as in rearrange(): the stream this rearranger orders its work on
  if (queue_pack_.size() < m.pack_bytes()) {
    if (reserved_) overflows_.fetch_add(1, std::memory_order_relaxed);
    retire(std::move(queue_pack_), true);
    queue_pack_ = dev_.allocate(std::max(m.pack_bytes(), layer_area_bytes()), staging_kind());
  }
  m.post(0, 0, area, queue_pack_.data(), stream_, *comm_);
  m.whole_layer_writes(out.writes);
  out.stats = m.stats;
  return out;
}

void rearranger::commit_layer(const staged_layer& staged, const rank_weights& w, const std::byte* area,
                              device::stream& s) const {
  write_rows(layout(), staged.layer, w, staged.writes, area, s);
}

void rearranger::verify_layer(int layer, const rank_weights& w, const placement& maps, const checksum_fn& expected) {
  const auto row_map = maps.phy2log(layer);
  const int base = rank_ * shape_.slots_per_rank();
  if (verify_scratch_.size() < largest_tensor()) {
    if (reserved_) overflows_.fetch_add(1, std::memory_order_relaxed);
    verify_scratch_ = dev_.allocate(largest_tensor(), device::memory_kind::pinned);  // no work touches the old one
  }
  const auto& host = verify_scratch_;
  for (int s = 0; s < shape_.slots_per_rank(); ++s) {
    const expert_id e = row_map[base + s];
    if (e < 0) continue;
    for (int t = 0; t < static_cast<int>(shape_.bundle.size()); ++t) {
      const auto bytes = shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert;
      stream_.copy(host.data(), w.slot(shape_, layer, t, s), bytes);
      try {
        stream_.synchronize(opts_.timeout);
      } catch (...) {
        dev_.release_after(std::move(verify_scratch_), stream_);  // a timed-out wait leaves the copy into it queued
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

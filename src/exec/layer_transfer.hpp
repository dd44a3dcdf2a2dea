// One layer's move on one rank, the one shape every stager uses (serial, pipelined, async):
// plan -> staging rows -> messages -> write-back. Which local slot is staged in which row, which
// peers' messages are packed into one, the order writes may happen in, and the statistics.
#pragma once

#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "eplb/comm/communicator.hpp"
#include "eplb/exec/model.hpp"
#include "eplb/exec/plan.hpp"
#include "eplb/exec/rearrange.hpp"

namespace eplb::exec {

/// Counts `bytes` against `peer` in st.bytes_per_peer, sized on the first transfer (a layer that
/// moves nothing allocates nothing).
inline void add_peer_bytes(layer_stats& st, int num_ranks, int peer, std::uint64_t bytes) {
  if (st.bytes_per_peer.empty()) st.bytes_per_peer.assign(static_cast<std::size_t>(num_ranks), 0);
  st.bytes_per_peer[static_cast<std::size_t>(peer)] += bytes;
}

/// Where an expert bundle sits in a staging area: row r, tensor t at r * row_bytes + offsets[t].
struct row_layout {
  const model_shape* shape = nullptr;
  std::span<const std::size_t> offsets;
  std::size_t row_bytes = 0;
  int rank = 0;

  [[nodiscard]] std::byte* row(std::byte* area, int r, int tensor) const {
    return area + static_cast<std::size_t>(r) * row_bytes + offsets[static_cast<std::size_t>(tensor)];
  }
};

/// Where a layer stopped part-way under the commit gate: before chunk `done`, with `row` what its
/// live slots hold on every rank (empty: not stopped part-way; the maps stay as they were).
struct layer_stop {
  int done = 0;
  std::vector<expert_id> row;
};

/// (live slot, staging row) pairs, duplicates included.
using row_writes = std::vector<std::pair<int, int>>;

/// Expert bundles each rank sends each rank in one layer, num_ranks x num_ranks (sender-major),
/// as plan_layer() pairs them on every rank.
[[nodiscard]] std::vector<std::size_t> pair_sends(std::span<const expert_id> old_row,
                                                  std::span<const expert_id> new_row, int num_ranks);

/// Which pairs of peers are packed into one message. Both ends of a pair decide alike: a pair is
/// packed when its bytes fit `cap` (0: no packing), and, with a `budget`, when the sender's packed
/// bytes stay within it, peers taken in ascending order (a receiver replays its senders' walks
/// from `pairs`, pair_sends() of the layer); `all` packs every pair (registered buffers).
struct pack_rule {
  std::size_t cap = 0;
  bool all = false;
  std::size_t budget = 0;  ///< 0: unlimited
  const std::vector<std::size_t>* pairs = nullptr;
};

/// Copies staging rows into live slots: each run of consecutive slots from consecutive rows is one
/// strided copy per tensor (few device calls per layer).
void write_rows(const row_layout& at, int layer, const rank_weights& w, std::span<const std::pair<int, int>> writes,
                const std::byte* area, device::stream& s);

class layer_transfer {
 public:
  /// `rows` staging rows are free; `packing` says which peers' messages are packed.
  layer_transfer(const row_layout& at, int layer, const rank_weights& w, layer_plan plan, std::size_t rows,
                 const pack_rule& packing);

  [[nodiscard]] const layer_plan& plan() const noexcept { return p_; }
  /// Bytes of this rank's packed sends (the packing buffer this layer needs).
  [[nodiscard]] std::size_t pack_bytes() const noexcept { return pack_total_; }
  /// Staging rows of the whole layer in one batch (rows are taken in order from 0).
  [[nodiscard]] std::size_t rows_needed() const noexcept { return buffer_slots_.size(); }

  /// The serial path: the layer moves in `chunks`' batches, each slot written after the chunk
  /// write_ready_after() names. Without it, the layer is one batch.
  void schedule(const chunk_plan& chunks);
  /// Staging rows for the experts at positions [lo, hi) of the schedule (all experts without one):
  /// local copies on `copies`; then their receives and sends on `comm`; sends to packed peers are
  /// first packed into `pack` on `copies`.
  void post(int lo, int hi, std::byte* area, std::byte* pack, device::stream& copies, comm::communicator& comm);
  /// Serial path, after the chunk ending at position `hi` was decided: writes the slots ready by
  /// then (one copy per tensor each, on `s`) and frees the rows no later write needs.
  void write_ready(int hi, std::byte* area, device::stream& s);
  /// A stopped layer's write-back: the staging row of buffer slot `staged_slot`, still held, into
  /// live slot `slot` (one copy per tensor, on `s`).
  void write_staged(int slot, int staged_slot, std::byte* area, device::stream& s);
  /// Slot writes the schedule has not done yet.
  [[nodiscard]] std::size_t writes_left() const noexcept { return pending_.size(); }
  /// One-batch paths: every changed slot from its staging row, duplicates from their primary's
  /// row (appended to `out`, counted in the statistics).
  void whole_layer_writes(row_writes& out);

  layer_stats stats;

 private:
  struct pending_write {
    int slot;         // live slot to write
    int from_slot;    // the staged slot whose row holds its bytes
    int ready_after;  // position in the chunk order after which the write may happen
  };

  [[nodiscard]] bool in_batch(expert_id e, int lo, int hi) const;
  void decide_packing(const pack_rule& rule);
  [[nodiscard]] bool packs(const pack_rule& rule, std::size_t sender, std::size_t receiver) const;
  void check_pairs(const std::vector<std::size_t>& pairs) const;
  void take_rows(int lo, int hi, std::byte* area, device::stream& copies);
  void post_recvs(int lo, int hi, std::byte* area, comm::communicator& comm);
  void post_sends(int lo, int hi, std::byte* pack, device::stream& copies, comm::communicator& comm);
  [[nodiscard]] expert_id first_recv(std::size_t peer) const;
  void account(int peer);
  [[nodiscard]] std::byte* slot(int tensor, int s) const;
  [[nodiscard]] std::size_t bytes(int tensor) const;
  [[nodiscard]] int tensors() const noexcept;

  row_layout at_;
  int layer_;
  const rank_weights& w_;
  layer_plan p_;
  std::size_t n_;
  std::size_t eb_;
  std::vector<int> buffer_slots_;
  const std::vector<int>* position_ = nullptr;  // the schedule's order; null: one batch
  std::vector<int> row_of_;                     // per local slot: its staging row (-1 none yet, -2 released)
  std::vector<std::size_t> free_rows_;
  std::vector<pending_write> pending_;
  std::vector<std::size_t> send_bytes_, recv_bytes_, pack_at_, cursor_;
  std::vector<char> pack_send_, pack_recv_, packed_now_;
  std::vector<std::pair<std::size_t, std::size_t>> recv_rows_;  // packed peers: first row, count
  std::size_t pack_total_ = 0;
};

}  // namespace eplb::exec

// The transfer plan of one layer for one rank: pure, deterministic, identical on every rank for the
// same maps (vLLM's move_to_buffer / move_from_buffer rules), plus the split of a layer into chunks
// of experts when it does not fit the staging cap, and the elastic-EP rank mappings.
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <vector>

#include "eplb/core/matrix.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/export.hpp"

namespace eplb::exec {

/// One expert on the wire: `slot` is the local source slot (send) or the local buffer row, which is
/// the first destination slot (recv).
struct transfer {
  expert_id expert;
  int peer;
  int slot;
};

struct EPLB_API layer_plan {
  int rank = 0;
  int slots = 0;                  ///< slots per rank
  std::vector<char> unchanged;    ///< per local slot: keeps its expert
  std::vector<char> from_local;   ///< changed slot whose new expert this rank already holds
  std::vector<char> primary;      ///< changed slot that receives its expert from a peer
  std::vector<int> local_source;  ///< per local slot with from_local: the old local slot to copy
  std::vector<int> primary_of;    ///< per duplicate slot: the primary slot it copies, else -1
  std::vector<transfer> sends;    ///< ascending expert, then ascending receiver
  std::vector<transfer> recvs;    ///< ascending expert
  std::vector<expert_id> old_local, new_local;

  /// The old expert of `slot` when this rank still reads that slot during the layer (it is the
  /// source of a send or of a local copy), else -1. The slot may be overwritten only after the chunk
  /// holding that expert.
  [[nodiscard]] expert_id read_until(int slot) const;
  /// Slots that go through the staging buffer (from_local or primary), ascending.
  [[nodiscard]] std::vector<int> buffer_slots() const;
  [[nodiscard]] bool is_noop() const;
};

/// Plans one layer for `rank`: old and new rows of phy2log over all ranks (-1 = empty slot).
/// Senders for expert e: the ranks holding it in `old_row` (ascending); receivers: ranks holding it
/// in `new_row` but not in `old_row` (ascending); receivers are split over senders in blocks, the
/// remainder round-robin, so every rank derives the same pairs.
[[nodiscard]] EPLB_API layer_plan plan_layer(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                             int num_ranks, int rank);

/// How one layer is split into communicator batches when it does not fit the staging cap: experts
/// in a global order (the same on every rank), cut into consecutive ranges.
struct EPLB_API chunk_plan {
  std::vector<int> position;                ///< per logical expert: its place in the order
  std::vector<std::pair<int, int>> ranges;  ///< [begin, end) of positions, one per batch

  [[nodiscard]] int chunk_of(expert_id e) const;
};

/// Where plan_chunks may end a chunk: wherever the cap allows, or only where every rank stopping
/// there leaves every expert in a live slot or in a staging row its rank can write back (what a
/// refused batch needs when it stops every rank alike: rearrange_options::commit_gate). The second
/// can need a few more rows for a layer to fit.
enum class cut_rule { anywhere, stop_safe };

/// Orders experts so that a slot still read as the source of its old expert X, and rewritten with
/// Y, sees X before Y wherever the dependencies allow (only cycles force a staging row to be held),
/// then cuts the order greedily so that, on every rank, the staging rows in use fit `buffer_rows`,
/// each cut where `rule` allows.
/// One range when everything fits. error(errc::invalid_argument) naming the layer and the rows
/// needed when even one expert does not fit.
[[nodiscard]] EPLB_API chunk_plan plan_chunks(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                              int num_ranks, int num_logical, std::size_t buffer_rows, int layer,
                                              cut_rule rule = cut_rule::stop_safe);

/// The serial path's schedule: the position in `chunks`' order after whose chunk live slot `slot`
/// of `plan` is written (its new expert is staged and its old expert, if still read, was sent), or
/// -1 when the slot is not written.
[[nodiscard]] EPLB_API int write_ready_after(const layer_plan& plan, const chunk_plan& chunks, int slot);

/// A rank's write-back when a chunked layer stops: the staging row of its buffer slot `staged_slot`
/// goes into live slot `slot`, whose expert has another copy or which the maps leave empty.
struct row_repair {
  int rank;
  int slot;
  int staged_slot;
};

/// What a layer holds on every rank when every rank stopped after its first `done` chunks (the
/// commit vote refused the next): a slot holds its new expert where its write happened, else its
/// old one, and every expert whose only copy was a staging row held between chunks is written back
/// by a rank holding it (`repairs`), so that `row` names what every live slot holds. `chunks` must
/// come from plan_chunks with cut_rule::stop_safe; error(errc::internal) where a stop loses an
/// expert.
struct stopped_layer {
  std::vector<expert_id> row;
  std::vector<row_repair> repairs;
};
[[nodiscard]] EPLB_API stopped_layer stop_after_chunks(std::span<const expert_id> old_row,
                                                       std::span<const expert_id> new_row, int num_ranks,
                                                       int num_logical, const chunk_plan& chunks, int done);

/// stop_after_chunks(...).row: the row a layer holds on every rank after its first `done` chunks.
[[nodiscard]] EPLB_API std::vector<expert_id> row_after_chunks(std::span<const expert_id> old_row,
                                                               std::span<const expert_id> new_row, int num_ranks,
                                                               const chunk_plan& chunks, int done);

/// Elastic EP, scale-down: `survivors` is a placement over the ranks that stay; `mapping[r]` is the
/// new rank of old rank r or -1 when it leaves. Returns the same placement over the old ranks, with
/// -1 in the slots of leaving ranks, so their experts are moved out while they are still alive.
[[nodiscard]] EPLB_API matrix<expert_id> expand_for_scale_down(const matrix<expert_id>& survivors,
                                                               std::span<const int> mapping, int slots_per_rank);
/// Elastic EP, scale-up: `old_map` over the old ranks; `mapping[r]` is old rank r's new rank.
/// Returns the old placement over `new_ranks` ranks, new ranks' slots empty (-1).
[[nodiscard]] EPLB_API matrix<expert_id> expand_for_scale_up(const matrix<expert_id>& old_map,
                                                             std::span<const int> mapping, int new_ranks,
                                                             int slots_per_rank);

}  // namespace eplb::exec

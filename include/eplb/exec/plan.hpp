// The transfer plan of one layer for one rank: pure, deterministic, identical on every rank for the
// same maps (vLLM's move_to_buffer / move_from_buffer rules), plus the split of a layer into chunks
// of experts when it does not fit the staging cap, and the elastic-EP rank mappings.
#pragma once

#include <cstddef>
#include <memory>
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

/// One copy on one rank in a serial schedule: from a live slot or a staging row (the other -1) into
/// a live slot or a staging row (the other -1).
struct serial_copy {
  int rank;
  int from_slot, from_row;
  int to_slot, to_row;
};

/// One expert bundle on the wire in a serial schedule: from a live slot or a staging row of
/// `from_rank` straight into live slot `to_slot` of `to_rank`, which nothing reads any more, or
/// (to_slot -1) into staging row `to_row`, written into its slot after the batch.
struct serial_move {
  expert_id expert;
  int from_rank, from_slot, from_row;
  int to_rank, to_slot;
  int to_row = -1;
};

/// One batch of a serial schedule: copies before it (slots saved into rows), its moves, and the
/// copies after it once it is written (local moves, duplicates, rows written into slots), in order.
struct serial_chunk {
  std::vector<serial_copy> before;
  std::vector<serial_move> moves;
  std::vector<serial_copy> after;
};

/// The schedule plan_chunks falls back to when the expert order needs more rows than the cap: slots
/// are written directly (no staging) once nothing reads their old bytes, and a cycle of slots that
/// read each other is broken by saving one slot in a staging row. Needs one row per rank whatever
/// the placement; identical on every rank.
struct serial_schedule {
  int num_logical = 0;
  int rows = 0;  ///< staging rows used on any rank
  std::vector<serial_chunk> chunks;
};

/// How one layer is split into communicator batches when it does not fit the staging cap: experts
/// in a global order (the same on every rank), cut into consecutive ranges; or, when that order
/// does not fit, a serial schedule (then `ranges` has one entry per chunk and `position` is empty).
struct EPLB_API chunk_plan {
  std::vector<int> position;                ///< per logical expert: its place in the order
  std::vector<std::pair<int, int>> ranges;  ///< [begin, end) of positions, one per batch
  std::shared_ptr<const serial_schedule> serial;

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
/// each cut where `rule` allows. One range when everything fits. When even one expert does not fit
/// (a cycle of slots on one rank holds several rows), the plan is a serial schedule
/// (plan_serial), which fits any `buffer_rows` >= 1 in more batches. Under cut_rule::stop_safe the
/// serial schedule leaves every expert a slot at every stop (plan_serial_stop_safe);
/// error(errc::invalid_argument) naming the layer should it ever not.
[[nodiscard]] EPLB_API chunk_plan plan_chunks(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                              int num_ranks, int num_logical, std::size_t buffer_rows, int layer,
                                              cut_rule rule = cut_rule::stop_safe);

/// The serial path's schedule: the position in `chunks`' order after whose chunk live slot `slot`
/// of `plan` is written (its new expert is staged and its old expert, if still read, was sent), or
/// -1 when the slot is not written.
[[nodiscard]] EPLB_API int write_ready_after(const layer_plan& plan, const chunk_plan& chunks, int slot);

/// A rank's write-back when a chunked layer stops: the staging row of its buffer slot `staged_slot`
/// (serial schedules: staging row `row`, staged_slot -1) goes into live slot `slot`, whose expert
/// has another copy or which the maps leave empty.
struct row_repair {
  int rank;
  int slot;
  int staged_slot;
  int row = -1;
};

/// The serial schedule of a layer for `buffer_rows` staging rows per rank (>= 1, any placement).
/// With `spread`, long cycles are broken at several slots at once, in fewer batches but with more
/// experts held only in rows between batches.
[[nodiscard]] EPLB_API std::shared_ptr<const serial_schedule> plan_serial(std::span<const expert_id> old_row,
                                                                          std::span<const expert_id> new_row,
                                                                          int num_ranks, int num_logical,
                                                                          std::size_t buffer_rows, bool spread);
/// plan_serial for cut_rule::stop_safe: where a stop would leave an expert only in a staging row on
/// a rank with no slot to put it back in, tries again saving other slots of the cycles, then
/// unwinding one cycle at a time; last, walks cycles one at a time with the saved bytes carried
/// along to a rank that holds the bytes moved last twice, which is safe at every stop with one row
/// per rank. nullptr if even that leaves a stop unsafe (a tree's batch; checked, never seen).
[[nodiscard]] EPLB_API std::shared_ptr<const serial_schedule> plan_serial_stop_safe(std::span<const expert_id> old_row,
                                                                                    std::span<const expert_id> new_row,
                                                                                    int num_ranks, int num_logical,
                                                                                    std::size_t buffer_rows);

/// What a layer holds on every rank when every rank stopped after its first `done` chunks (the
/// commit vote refused the next): a slot holds its new expert where its write happened, else its
/// old one, and every expert whose only copy was a staging row held between chunks is written back
/// by a rank holding it (`repairs`), so that `row` names what every live slot holds. `chunks` must
/// come from plan_chunks with cut_rule::stop_safe; error(errc::internal) where a stop loses an
/// expert. A serial schedule writes live slots in its batches, so there even a stop before the
/// first chunk is written (`done` 0) can change the row: the slots the refused batch wrote into are
/// left empty (-1), whatever bytes arrived.
struct stopped_layer {
  std::vector<expert_id> row;
  std::vector<row_repair> repairs;
};
[[nodiscard]] EPLB_API stopped_layer stop_after_chunks(std::span<const expert_id> old_row,
                                                       std::span<const expert_id> new_row, int num_ranks,
                                                       int num_logical, const chunk_plan& chunks, int done);

/// What a layer holds when every rank ran the first `done` chunks of `sch` and the next was
/// refused (see stop_after_chunks), or nullopt when an expert would be left without a slot.
[[nodiscard]] EPLB_API std::optional<stopped_layer> serial_stop(const serial_schedule& sch,
                                                                std::span<const expert_id> old_row, int num_ranks,
                                                                int done);

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

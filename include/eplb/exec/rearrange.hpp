// Synchronous, in-place rearrangement of expert weights on any communicator: local copies and
// receives into a staging buffer, sends from the live slots, then buffer -> live slots (and
// duplicates), then the layer's maps. Live weights keep their addresses (captured CUDA graphs stay
// valid).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

#include "eplb/comm/communicator.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/device/device.hpp"
#include "eplb/exec/model.hpp"
#include "eplb/exec/plan.hpp"
#include "eplb/export.hpp"

namespace eplb::exec {

class layer_transfer;
class layer_pipeline;
struct row_layout;
struct layer_stop;
struct pack_rule;

/// The checksum verification compares against: the expected checksum of `tensor` of `expert` in
/// `layer` (see checksum()).
using checksum_fn = std::function<std::uint64_t(int layer, expert_id expert, int tensor)>;

/// 64-bit checksum of host bytes (the one verification uses).
[[nodiscard]] EPLB_API std::uint64_t checksum(std::span<const std::byte> bytes) noexcept;

struct rearrange_options {
  std::size_t staging_bytes = 0;              ///< cap on the staging buffer; 0 = one layer of this rank's slots
  std::chrono::milliseconds timeout{60'000};  ///< every wait on the device
  checksum_fn verify;                         ///< when set, every slot is checked after its layer moves
  /// When a layer fits the staging cap in one chunk, everything sent to one peer is packed into one
  /// message, and everything received from one peer lands in consecutive staging rows as one
  /// message: a few large transfers instead of one per tensor of every expert (NCCL moves small
  /// messages far below the link's rate). A pair is packed when its bytes fit pack_bytes, which both
  /// ends decide alike; the packing buffer holds this rank's packed sends of one layer.
  bool coalesce = true;
  std::size_t pack_bytes = 0;  ///< largest packed message; 0 = one layer of this rank's slots
  /// Packs a rank's sends of one layer only while they fit its staging rows' worth (the packing
  /// reserve_memory() makes), peers in ascending order; the pairs beyond go unpacked. Both ends
  /// decide alike from the layer's pair counts (every rank must set it alike), so a reserved
  /// rearranger never grows its packing (registered buffers pack everything and may still grow).
  bool pack_within_staging = false;
  /// rearrange() overlaps layers when two layers fit the staging cap (0 = they do): layer L's
  /// transfers run while a second stream writes layer L-1 into place and stages layer L+1, and the
  /// host waits only for transfers. Each layer still commits only after its own transfers succeed.
  bool pipeline = true;
  /// Makes the staging and packing buffers registered memory of the communicator
  /// (allocate_registered), so that a backend that can (nccl over NVLink) moves bytes straight
  /// between them instead of through its own buffers. Every message is then packed (both ends of
  /// every transfer in registered memory), so it needs coalesce and a staging cap of at least one
  /// layer (error(errc::invalid_argument) otherwise); the buffers are made at their largest expected
  /// size (two layers of this rank's slots each when layers are pipelined, else one). Every rank
  /// must set it alike.
  bool register_buffers = false;
  /// Makes the write of every batch into live slots a collective decision (EplbState's sync mode).
  /// Called on every rank for every batch of every layer whose row changes (one batch per layer,
  /// or per chunk when a layer is moved in chunks), in the same order, once this rank's transfers of
  /// the batch ended (`failure` holds their error, if any); it returns "" when every rank may write
  /// the batch, else why not (the first failure, naming its rank), and gives every rank the same
  /// answer. A refused batch ends the rearrangement on every rank at the same place: layers before
  /// it committed, a chunked layer partly moved with its maps saying which slots hold what. Empty:
  /// each rank writes as soon as its own transfers succeed.
  std::function<std::string(int layer, int chunk, std::exception_ptr failure)> commit_gate;
};

struct layer_stats {
  int layer = 0;
  int chunks = 0;
  int messages = 0;  ///< sends and receives posted to the communicator
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
  std::uint64_t bytes_copied_locally = 0;  ///< through the staging buffer, and duplicates
  std::uint64_t bytes_same_node = 0;       ///< sent + received with peers on this rank's node
  std::uint64_t bytes_cross_node = 0;
  std::vector<std::uint64_t> bytes_per_peer;  ///< sent + received, indexed by peer; empty: none moved
  double seconds = 0.0;
};

/// One layer staged for a later commit (the async path): where each changed slot's bytes wait.
struct staged_layer {
  int layer = -1;
  std::vector<expert_id> new_row;
  std::vector<std::pair<int, int>> writes;  ///< (live slot, staging row), duplicates included
  layer_stats stats;
};

class EPLB_API rearranger {
 public:
  /// `weights` are this rank's live slots; `stream` orders every copy (the communicator's stream is
  /// set to it). Throws error(errc::invalid_argument) for an inconsistent shape.
  rearranger(model_shape shape, int rank, device::device& dev, device::stream& stream, comm::communicator& comm,
             rearrange_options opts = {});
  /// Staging and packing memory goes to the device to be freed once this rearranger's streams have
  /// passed the work queued on them (after a timed-out wait, copies into it may still be queued).
  /// The stream given here must still exist.
  ~rearranger();
  rearranger(const rearranger&) = delete;
  rearranger& operator=(const rearranger&) = delete;

  /// Moves one layer to `new_row` and commits the layer's maps in `maps`. Maps, row or weights that
  /// do not fit the model (shape, expert ids, a null tensor pointer) are errors before anything
  /// moves: errc::invalid_map for the row, errc::invalid_argument otherwise. If it fails (error or
  /// timeout) and the layer fit the staging cap in one chunk of the expert order, the live slots
  /// and maps of the layer are exactly as before; the error names the layer. With several chunks a
  /// failure after the first chunk leaves the layer partly moved, which the error says, and so does
  /// any failure of a serial schedule (plan_serial: a cap below what the expert order needs), whose
  /// batches write live slots; under commit_gate every rank stops before the same chunk and the
  /// maps name what every live slot holds, leaving empty (-1) the slots a refused batch wrote
  /// (stop_after_chunks). Without commit_gate the maps of a partly moved layer stay as they were:
  /// ranks do not know where the others stopped.
  layer_stats rearrange_layer(int layer, const rank_weights& weights, placement& maps,
                              std::span<const expert_id> new_row);
  /// All layers in order. The whole new map (and the maps and weights) is checked before any layer
  /// moves; layers already committed stay committed when a later one fails while moving.
  std::vector<layer_stats> rearrange(const rank_weights& weights, placement& maps, const matrix<expert_id>& new_map);

  /// Checks every local slot of `layer` against `expected`; error(errc::verification_failed) naming
  /// the first mismatch (layer, slot, tensor, expert).
  void verify_layer(int layer, const rank_weights& weights, const placement& maps, const checksum_fn& expected);

  /// Allocates now the memory later moves use, so that they allocate nothing: for rearrange() and
  /// rearrange_layer() the staging buffer at its largest (two layers of this rank's slots when
  /// layers are pipelined, else the staging cap's rows) and a packing buffer of as many bytes; with
  /// `for_queue` only queue_layer()'s packing buffer (one layer); the verification scratch when
  /// options.verify is set. Unless options.pack_within_staging (and not register_buffers), a move
  /// that needs more packing than that (this rank sends more than its staging rows' worth in one
  /// layer; at most (ranks - 1) times that) grows the buffer, once per new high, and counts it in
  /// overflows(). Idempotent; not while a move runs. Returns the bytes the rearranger holds.
  device::memory_use reserve_memory(bool for_queue);
  /// Allocations moves made after reserve_memory() because they needed more than it reserved.
  [[nodiscard]] std::int64_t overflows() const noexcept { return overflows_.load(std::memory_order_relaxed); }

  [[nodiscard]] std::size_t staging_rows() const noexcept { return rows_; }
  [[nodiscard]] comm::communicator& communicator() const noexcept { return *comm_; }
  /// Moves on `c` from now on (a communicator made again after a failure): same rank and size.
  /// Only between rearrangements, while the old communicator still exists (registered buffers move
  /// from it to `c`; if registering with `c` throws, nothing has changed). Every communicator the
  /// rearranger used must outlive it.
  void set_communicator(comm::communicator& c);

  /// Async building blocks. Bytes of one staging area: a row per local slot (a whole layer).
  [[nodiscard]] std::size_t layer_area_bytes() const noexcept;
  /// Enqueues `layer`'s local copies into `area` on this rearranger's stream and queues its sends
  /// and receives on the communicator as one batch; the caller executes it, and runs the batch to
  /// its end before the next queue_layer (sends to one peer are packed into one message, as on the
  /// sync path, in a buffer of this rearranger's). Live slots are only read.
  [[nodiscard]] staged_layer queue_layer(int layer, const rank_weights& weights, std::span<const expert_id> old_row,
                                         std::span<const expert_id> new_row, std::byte* area);
  /// Enqueues area -> live slots (duplicates included) on `s`.
  void commit_layer(const staged_layer& staged, const rank_weights& weights, const std::byte* area,
                    device::stream& s) const;

 private:
  friend class layer_pipeline;  // the pipelined stager (pipeline.cpp)

  [[nodiscard]] row_layout layout() const noexcept;
  void check_communicator(const comm::communicator& c) const;
  layer_stats move(int layer, const rank_weights& w, std::span<const expert_id> old_row,
                   std::span<const expert_id> new_row, layer_stop& stop);
  layer_stats move_serial(int layer, const rank_weights& w, std::span<const expert_id> old_row,
                          const chunk_plan& chunks, layer_stop& stop);
  [[nodiscard]] chunk_plan chunks_of(int layer, std::span<const expert_id> old_row,
                                     std::span<const expert_id> new_row) const;
  std::exception_ptr post_chunk(layer_transfer& m, const chunk_plan& chunks, std::size_t c);
  void write_back_held(layer_transfer& m, std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                       const chunk_plan& chunks, int done, layer_stop& stop);
  void pass_gate(int layer, int chunk, std::exception_ptr failure) const;
  void vote_noop_layer(int layer, std::span<const expert_id> old_row, std::span<const expert_id> new_row) const;
  [[nodiscard]] bool pipelines() const noexcept;
  std::vector<layer_stats> rearrange_pipelined(const rank_weights& w, placement& maps,
                                               const matrix<expert_id>& new_map);
  [[nodiscard]] device::memory_kind staging_kind() const;
  [[nodiscard]] std::size_t pack_cap() const noexcept;
  [[nodiscard]] pack_rule packing(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                  std::size_t cap, bool all, std::vector<std::size_t>& pairs) const;
  [[nodiscard]] std::size_t largest_tensor() const noexcept;
  void reserve(device::buffer& b, comm::registration& reg, std::size_t bytes, std::size_t largest);
  void retire(device::buffer b, bool wait) noexcept;

  model_shape shape_;
  int rank_;
  device::device& dev_;
  device::stream& stream_;
  comm::communicator* comm_;
  rearrange_options opts_;
  std::vector<std::size_t> offsets_;  // of each tensor inside a staging row
  std::size_t row_bytes_ = 0;
  std::size_t rows_ = 0;
  device::buffer staging_;
  device::buffer pack_;                           // sends packed per peer (coalesce)
  device::buffer queue_pack_;                     // queue_layer's packed sends (never registered)
  device::buffer verify_scratch_;                 // verify_layer's pinned copy of one tensor
  bool reserved_ = false;                         // reserve_memory() ran: growing counts as an overflow
  std::atomic<std::int64_t> overflows_{0};        // grown on the io thread (async), read by the serving one
  comm::registration staging_reg_, pack_reg_;     // declared after the buffers: released before them
  std::vector<comm::registered_memory> retired_;  // outgrown registered buffers, kept until the comm changes
  std::unique_ptr<device::stream> copies_;        // the pipelined path's staging and write-back stream
};

}  // namespace eplb::exec

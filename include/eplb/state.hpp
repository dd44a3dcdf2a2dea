// EplbState: what a serving loop owns. Call step() once per forward step on every rank; it folds the
// step's expert load into the window, triggers a rebalance every step_interval steps (the first
// after a quarter interval, as vLLM) and, in async mode, commits staged layers at step boundaries:
// a layer is committed only when every rank has staged it, and all ranks commit it in the same step.
//
// Errors: step() throws eplb::error when a rebalance failed on this rank or on a peer (errc::timeout,
// errc::peer_failure...). Every layer not yet committed keeps its live weights and maps; layers
// already committed stay committed; the next interval starts a fresh rebalance.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "eplb/comm/communicator.hpp"
#include "eplb/config.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/device/device.hpp"
#include "eplb/exec/model.hpp"
#include "eplb/export.hpp"

namespace eplb {

/// Async mode commits at most this many layers in one step, bounding the host time of a step.
inline constexpr int max_commits_per_step = 2;
/// Async mode starts a rebalance this many steps after the step that triggered it (and read the
/// load back): by then the copy has long finished in an engine that is at most a step ahead.
inline constexpr int load_readback_lag_steps = 2;

/// The element type of an engine's buffer.
enum class element_type { int32, int64 };

/// A buffer the engine owns, in memory of eplb's device (on CUDA: device memory of that GPU), that
/// eplb reads or writes in stream order on the serving stream. The engine keeps it alive while eplb
/// runs; its address must be aligned to its element size.
struct engine_buffer {
  void* data = nullptr;
  element_type type = element_type::int64;
};

/// Buffers an engine hands in instead of eplb's own, each optional and each with its own element
/// type (vLLM's layers hold an int32 load tensor and int64 maps). Layouts as eplb's own buffers.
struct engine_buffers {
  /// layers x physical slots of token counts that the router only ever adds to. eplb never clears
  /// it (nor may the engine): the window is the difference of two readings, taken modulo 2^32 or
  /// 2^64, so a counter that wraps stays right while a window's load per slot fits in the type.
  std::optional<engine_buffer> load;
  std::optional<engine_buffer> phy2log;        ///< layers x physical slots; -1 for an empty slot
  std::optional<engine_buffer> log2phy;        ///< layers x experts x device_max_replicas(), padded with -1
  std::optional<engine_buffer> replica_count;  ///< layers x experts
};

struct model_desc {
  exec::model_shape shape;  ///< layers, experts, slots (experts + redundant), ranks, bundle
  int num_groups = 1;       ///< expert groups (group-limited routing)
  int num_nodes = 1;
};

/// How a rebalance ended on this rank.
enum class rebalance_outcome {
  committed,  ///< every layer committed (a layer the plan left alone counts as committed)
  skipped,    ///< the plan was not better by config::min_improvement: nothing moved
  failed,     ///< step() threw (here or because of a peer); layers committed before stay committed
  stopped,    ///< stop() ended it on this rank
};
[[nodiscard]] EPLB_API std::string_view to_string(rebalance_outcome o) noexcept;

/// One rebalance as this rank saw it, from its trigger to its end. id, trigger_step, start_step and
/// the balancedness figures are the same on every rank; bytes and times are this rank's.
struct rebalance_record {
  std::int64_t id = 0;                  ///< metrics::rebalances when it was triggered: 1, 2, ...
  std::int64_t trigger_step = 0;        ///< the last step of the window it planned from
  std::int64_t start_step = 0;          ///< the step it planned in (async: trigger + lag, or later)
  std::int64_t first_commit_step = -1;  ///< the step that committed its first layer; -1: none
  std::int64_t end_step = 0;            ///< the step it ended in on this rank
  rebalance_outcome outcome = rebalance_outcome::committed;
  std::string error;                ///< failed or stopped: what step() threw (or why it stopped)
  int communicator_generation = 0;  ///< of the communicator in use when it ended (0: the first)
  /// Balancedness (vLLM's: mean over max of tokens per rank) of the summed load of every rank over
  /// the window, from the load all-reduce the rebalance runs anyway: of the maps before it, of the
  /// maps after it (committed layers only), and of the planned placement. 0 when it never planned.
  double balancedness_before = 0;
  double balancedness_after = 0;
  double balancedness_ideal = 0;
  int layers_committed = 0;
  std::uint64_t bytes_sent = 0;  ///< this rank's, over the communicator
  std::uint64_t bytes_received = 0;
  std::uint64_t bytes_same_node = 0;  ///< sent + received with peers on this rank's node
  std::uint64_t bytes_cross_node = 0;
  std::vector<std::uint64_t> bytes_per_peer;  ///< sent + received, indexed by peer rank
  double plan_seconds = 0;                    ///< load all-reduce and policy
  double transfer_seconds = 0;                ///< the committed layers' transfers and copies, summed
  double commit_seconds = 0;                  ///< host time step() spent committing its layers (async)
  double total_seconds = 0;                   ///< trigger to end
};

enum class event_level { debug, info, warning, error };
enum class event_kind {
  rebalance_started,    ///< info
  layers_committed,     ///< debug: a step committed layers of the rebalance in flight
  rebalance_finished,   ///< info: committed
  rebalance_skipped,    ///< info
  rebalance_failed,     ///< error (warning when it failed on a peer or was stopped)
  communicator_remade,  ///< warning: after a failure, under a new generation
  balancedness,         ///< info: config::log_balancedness's line (this rank's load only)
  rank_set_changed,     ///< info: rescale() (or a join) made a new rank set, or this rank left
  rescale_fill_failed,  ///< error: filling the joining ranks failed (rescale_report::fill_error)
  experts_masked,       ///< error: recover() serves on without experts lost with a rank (masked)
};
[[nodiscard]] EPLB_API std::string_view to_string(event_kind k) noexcept;
[[nodiscard]] EPLB_API std::string_view to_string(event_level l) noexcept;

/// What state_params::on_event receives. The views and the pointer live for the call only.
struct event {
  event_level level = event_level::info;
  event_kind kind = event_kind::rebalance_started;
  std::int64_t step = 0;                     ///< metrics::steps when it happened
  std::int64_t rebalance_id = 0;             ///< the rebalance it is about; 0: none
  std::string_view message;                  ///< one line, as `log` would get it
  const rebalance_record* record = nullptr;  ///< the finished, skipped and failed kinds
};

struct state_params {
  config cfg;
  model_desc model;
  int rank = 0;
  device::device* dev = nullptr;
  device::stream* serving_stream = nullptr;  ///< the engine's stream: load copies and commits
  exec::rank_weights weights;                ///< this rank's live expert slots
  std::shared_ptr<comm::store> store;        ///< CPU collectives: load all-reduce, commit agreement
  std::unique_ptr<comm::communicator> comm;  ///< or left empty: created from cfg and comm_setup
  comm::setup comm_setup;                    ///< rank, size and store are filled in from the above
  /// Optional: makes the communicator again after a failed rebalance (a failed batch leaves gloo,
  /// nccl and cuda_ipc communicators broken). Called with generation 1, 2, ... on every rank at the
  /// same rebalance, on the background thread in async mode. Without it, a communicator eplb made
  /// itself is made again from cfg and comm_setup under a fresh store prefix; one handed in through
  /// `comm` is kept.
  std::function<std::unique_ptr<comm::communicator>(int generation)> comm_factory;
  /// Optional: wraps each communicator eplb makes itself (from cfg and comm_setup), e.g. for
  /// tracing or fault injection; gets the generation, returns the wrapper (which must forward
  /// register_memory and allocate_registered). Not with comm_factory or `comm`.
  std::function<std::unique_ptr<comm::communicator>(std::unique_ptr<comm::communicator>, int generation)> comm_wrap;
  std::optional<matrix<expert_id>> initial_phy2log;  ///< default: vLLM's round-robin start
  /// Optional: the minimum over ranks of `staged_here` (or of a negative failure code), folded by the
  /// engine into a collective it already runs; layers agreed on are committed in the same step.
  /// Default: a CPU all-reduce over the store on a background thread, run only while a rebalance
  /// is in flight and read config::commit_lag_steps steps later, so step() does not wait on the network.
  std::function<std::int64_t(std::int64_t staged_here)> commit_agreement;
  /// Optional: every event's line of level info and above when on_event is not set (balancedness
  /// lines, rebalances started, finished, skipped and failed, communicators made again); default:
  /// stderr on rank 0. Called as on_event is.
  std::function<void(std::string_view)> log;
  /// Optional: every event, debug level included, in the order they happen. Called on the thread
  /// that calls step() or stop(), from inside them only (never from the background thread), so it
  /// must be quick and must not call back into the state; what it throws is dropped.
  std::function<void(const event&)> on_event;
  /// Optional: the engine's own load and map buffers (see engine_buffers); eplb allocates the others.
  engine_buffers buffers;
  /// Optional, for recover(): loads logical expert `expert` of `layer` from the engine's checkpoint
  /// into this rank's local slot `local_slot` (every tensor of the bundle, at weights' slot), done
  /// or queued on the serving stream before it returns; throws on failure. Called on the serving
  /// thread, for experts whose only replicas were on lost ranks.
  std::function<void(int layer, int expert, int local_slot)> reload_expert;
  /// Elastic EP: > 0 makes this a rank that joins a running rank set as the peers' rescale() makes
  /// it, at their stats().rank_set_epoch + 1. `model` describes the new set, `rank` is this rank's
  /// place in it (one the rank mapping leaves free), `weights` are its empty slots, and
  /// initial_phy2log stays empty: the constructor waits (up to cfg.timeout) for the peers' maps,
  /// step count and rebalance count, then takes part in the rearrangement that fills its slots.
  std::int64_t join_epoch = 0;
};

/// A change of the rank set (elastic EP), as vLLM's scale-up and scale-down: see eplb_state::rescale.
struct rescale_params {
  int new_size = 0;  ///< ranks in the new set
  /// One entry per rank of the current set: its rank in the new set, or -1 for a rank that leaves.
  /// Ranks that stay keep their slots (and every rank keeps its slot count); new ranks that no
  /// entry names join with empty slots (they construct their state with state_params::join_epoch).
  std::vector<int> rank_mapping;
  /// The new set's communicator setup (rank and size are filled in): needed where the current one
  /// cannot span the new set (loopback: a world of the new size). Default: the current setup, under
  /// a fresh store prefix.
  std::optional<comm::setup> comm_setup;
  /// Makes the new set's communicator (generation 0, 1, ...) where the state's came from the engine
  /// (state_params::comm or comm_factory); required then.
  std::function<std::unique_ptr<comm::communicator>(int generation)> comm_factory;
  /// The engine's buffers for the new slot count; required for every buffer the engine gave before
  /// (their sizes change with the number of slots), and only those.
  engine_buffers buffers;
};

/// What recover() needs from the engine for the survivors' set, whose size it learns only once
/// the survivors agreed: the communicator setup and the engine's buffers for `size` ranks.
struct recover_params {
  /// Default: the current setup (rank and size filled in) under a fresh store prefix; needed where
  /// that cannot span the survivors (loopback: a world of `size`, the same object on every rank).
  std::function<comm::setup(int size)> comm_setup;
  /// Required for every buffer the engine gave before (their sizes change with the slots).
  std::function<engine_buffers(int size)> buffers;
};

/// A logical expert of a layer without a replica: its bytes were lost with a rank and not loaded
/// back (recover() without reload_expert, or the reload failed). Its replica_count is 0 and its
/// log2phy row all -1: the engine's router must send it no token (mask its router logit).
struct masked_expert {
  int layer = 0;
  int expert = 0;
  friend bool operator==(const masked_expert&, const masked_expert&) = default;
};

/// What rescale() did on this rank.
struct rescale_report {
  std::int64_t epoch = 0;  ///< the rank set's epoch now (stats().rank_set_epoch)
  bool left = false;       ///< this rank left: its state is stopped, its slots hold nothing served
  int rank = 0;            ///< this rank's place in the new set (-1 when it left)
  int num_ranks = 0;       ///< the new set's size
  int layers_moved = 0;    ///< layers the rearrangements committed with a changed placement
  std::uint64_t bytes_received = 0;
  double seconds = 0;
  /// The move that fills the joining ranks (recover(): re-plans over the survivors) failed, here
  /// or on a peer, alike on every rank: the new set is in place with the layers committed before
  /// the failure; joining ranks' slots of the other layers stay empty (no token is routed to them)
  /// until the next rebalance fills them.
  std::string fill_error;
  std::vector<int> lost_ranks;  ///< recover(): the previous set's ranks that did not answer
  int experts_reloaded = 0;     ///< recover(): (layer, expert) pairs loaded back by reload_expert
  /// recover(): the experts lost with the ranks and not loaded back, served on without (every rank
  /// names the same); the reload failures, if any, are in the experts_masked event.
  std::vector<masked_expert> masked;
};

struct metrics {
  std::int64_t steps = 0;
  std::int64_t rebalances = 0;  ///< started (triggered); see rebalances_failed and history()
  std::int64_t layers_committed = 0;
  std::uint64_t bytes_moved = 0;       ///< received by this rank
  double plan_seconds = 0;             ///< last rebalance: all-reduce + policy
  double stage_seconds_per_layer = 0;  ///< last staged layer (async)
  double commit_host_seconds_max = 0;  ///< most host time one step() spent committing
  double rebalance_seconds = 0;        ///< last rebalance: trigger to last commit
  double balancedness_before = 0;      ///< last rebalance, of the global window load
  double balancedness_after = 0;
  bool rebalance_in_flight = false;
  std::int64_t rebalances_skipped = 0;  ///< placements not better by config::min_improvement
  std::int64_t rebalances_failed = 0;   ///< ended failed or stopped on this rank
  // eplb_state::reserve(): bytes held for rebalances on this rank (staging, packing, the
  // communicator's staging or mailbox), and allocations rebalances made past them.
  std::uint64_t reserved_device_bytes = 0;  ///< device memory (the host device's: host memory)
  std::uint64_t reserved_pinned_bytes = 0;  ///< pinned host memory
  std::int64_t reserve_overflows = 0;       ///< a layer needed more packing than reserved: grown
  std::int64_t rank_set_epoch = 0;          ///< rank-set changes (rescale) so far: 0 for the first set
  std::int64_t masked_experts = 0;          ///< (layer, expert) pairs served without (masked_experts())
};

struct step_report {
  bool rebalance_started = false;
  bool rebalance_finished = false;
  bool rebalance_skipped = false;  ///< finished without moving: the placement was not better enough
  int layers_committed = 0;        ///< in this step
  std::int64_t started_id = 0;     ///< the id of the rebalance started in this step; 0: none
  /// (layer, expert) pairs no token may be routed to (masked_expert); 0 unless a recover() lost
  /// experts it could not load back.
  std::int64_t masked_experts = 0;
  /// The rebalance that ended in this step (finished, skipped, or failed in a step that did not
  /// throw), else nullptr. Valid until the next step(); history() keeps a copy. A rebalance can
  /// end and the next start in the same step: this is the one that ended (its own id).
  const rebalance_record* finished = nullptr;
};

class EPLB_API eplb_state {
 public:
  /// Validates everything (config fields, model shape, groups and nodes, weights) and creates the
  /// communicator, the side stream and the background thread (async). Throws eplb::error naming
  /// what is wrong.
  explicit eplb_state(state_params params);
  ~eplb_state();  ///< stop(); never throws
  eplb_state(const eplb_state&) = delete;
  eplb_state& operator=(const eplb_state&) = delete;

  /// The load buffer: layers x physical slots of int64 token counts, device memory on CUDA (host
  /// memory on the host device), or the engine's own when it gave an int64 one (nullptr for an
  /// int32 one). The engine's router only adds to it, and eplb never clears it: step() reads it only
  /// on the steps a window needs (see step()).
  [[nodiscard]] std::int64_t* load_buffer() const noexcept;
  /// Adds counts (one per physical slot) for `layer` to the current step, from the host.
  void record_load(int layer, std::span<const std::int64_t> counts);

  /// Once per forward step on every rank. The window of a rebalance triggered at step T is the load
  /// of steps T - window_size + 1 .. T, the same steps on every rank: the difference of a reading of
  /// the load buffer taken at step T - window_size (one stream-ordered copy into pinned memory) and
  /// one taken at step T (a copy and a pooled event). Other steps queue nothing on the serving
  /// stream unless they commit layers (then the copies, map writes and a pooled event: no event is
  /// created and no host function queued in any step). Sync mode waits for step T's reading inside step T (it
  /// rebalances there anyway); async mode does not wait: every rank starts the rebalance from it
  /// load_readback_lag_steps later (in the same step everywhere), waiting then only if the copy is
  /// still not done. A rebalance that starts d steps late (async: the previous one still in flight)
  /// plans from a window d steps longer (with a window longer than the interval, so may the next
  /// few: their start had passed). Dummy steps count as steps and take their place in the window;
  /// their record_load() counts are dropped, but counts the router adds to the buffer in a dummy
  /// forward pass are counted (an engine should not record load there): unlike vLLM, whose window
  /// holds the last window_size non-dummy steps of each rank.
  step_report step(bool is_dummy = false);

  /// Allocates now everything a rebalance uses on this rank, bounded by the config (the staging cap,
  /// the largest layer's bundles, the pipeline's two areas): staging and packing buffers, the
  /// communicator's staging (gloo: options.staging_bytes of pinned memory), so that rebalances
  /// allocate nothing. Call it in the engine's profile run, before sizing the KV cache from free
  /// memory). Memory comes through the device's allocator hook when one is set. With
  /// config::reserve_memory (which calls it in the constructor) no rebalance needs more; without
  /// it, a layer whose packed sends exceed this rank's staging rows grows the packing buffer,
  /// counted in metrics::reserve_overflows. Idempotent; fills metrics::reserved_device_bytes and
  /// reserved_pinned_bytes. Errors: errc::cancelled after stop(), errc::invalid_argument while a
  /// rebalance is in flight, errc::out_of_memory when the allocator hook has no memory.
  void reserve();

  /// Starts no rebalance after this step, so that a shutdown can step on until
  /// metrics::rebalance_in_flight is false and stop() with nothing to abort (one started before
  /// still runs to its end; with an interval shorter than a rebalance, a drain without this never
  /// ends). Call it in the same step on every rank: a rank that triggers a rebalance its drained
  /// peers do not join gets errc::peer_failure once they stop. Idempotent, never throws.
  void drain() noexcept;

  /// Elastic EP: changes the rank set. Called on every rank of the current set in the same step
  /// (between two step() calls), while the joining ranks construct theirs with join_epoch. The
  /// ranks first agree that all of them arrived (each waits up to config::timeout for the others,
  /// posting what its own slots hold); only then does a rebalance in flight end (as `stopped`;
  /// layers committed stay committed), so no rank still in its step sees a peer's transfers end.
  /// Where ranks leave, a
  /// rearrangement over the current set first moves every expert off them onto a placement planned
  /// for the survivors; where ranks join, one over the new set fills their empty slots. Both plan
  /// from the load all-reduce of the latest windows, commit batch by batch under the commit vote
  /// (as a sync rebalance), and end with identical maps on every rank. Then the maps, the load
  /// buffer and the device maps have the new slot count: read load_buffer() and the device maps'
  /// pointers again. The next rebalance comes step_interval steps later.
  /// Errors: errc::invalid_argument naming the field (rescale_params.rank_mapping[2]...) before
  /// anything changes; with nothing changed on every rank (serve on, or retry on every rank):
  /// errc::timeout naming the ranks that did not arrive in time, errc::invalid_argument naming two
  /// ranks that called it after different steps; when the move off leaving ranks fails (here or on a peer) it throws on
  /// every rank, which stay in the current set with identical maps (layers committed stay committed): retry the
  /// rescale. Once the new set is in place nothing throws: a failed fill of the joining ranks is the report's
  /// fill_error. A communicator that cannot be made leaves the state stopped.
  rescale_report rescale(rescale_params params);
  /// Serving on after lost ranks: call it on every rank still alive once step() threw because a
  /// peer died or went silent (errc::peer_failure, errc::timeout). The ranks that call it within
  /// twice config::timeout of each other agree on who they are (a rank answering later is left out and
  /// gets errc::peer_failure); they become a new set of their own (ranks renumbered in order, maps
  /// without the lost ranks' slots, identical on every rank) and go on from the same step count
  /// (the most any of them served: stats().steps may jump). Experts whose only replicas were on
  /// lost ranks are loaded back by state_params::reload_expert into empty slots or slots of surplus
  /// replicas (every rank picks the same). Those without the hook, or whose reload threw, are
  /// masked (rescale_report::masked, masked_experts(), step_report::masked_experts, the
  /// experts_masked event): no replica, replica_count 0, the router must send them no token; their
  /// slots stay empty and rebalances keep them out. Then a rearrangement re-plans over the
  /// survivors (its failure is the report's fill_error). Nothing changed where every rank answered
  /// but this one's set is made again. Errors, after which the state is stopped:
  /// errc::peer_failure when the survivors have fewer slots than experts, or this rank was left out.
  /// errc::invalid_argument before anything when the communicator came from the engine
  /// (state_params::comm or comm_factory), or recover_params::buffers is missing for engine buffers.
  rescale_report recover(recover_params params = {});
  /// Masked experts back: every rank calls it between the same two steps with no rebalance in
  /// flight (drain() first). reload_expert loads each into a slot every rank picks alike (an empty
  /// one, else a surplus replica's); the ranks agree on what failed, which stays masked (report's
  /// masked; experts_reloaded the others), and the maps change in serving-stream order after what
  /// the hook queued there. Errors with nothing changed: errc::invalid_argument with a rebalance
  /// in flight or ranks a step apart, errc::timeout naming ranks that did not call it in time.
  rescale_report restore_masked();
  /// The experts served without (masked after a lost rank), layer by layer; empty normally.
  [[nodiscard]] std::vector<masked_expert> masked_experts() const;
  /// The latest rescale() on this rank, or for a joining rank its join (empty before either).
  [[nodiscard]] const rescale_report& last_rescale() const noexcept;

  /// Cancels a rebalance in flight, waits for in-flight transfers and device work (bounded by the
  /// timeout) and frees buffers. Idempotent, never throws; step() must not be called afterwards.
  void stop() noexcept;

  /// Maps as the serving loop sees them (committed layers only).
  [[nodiscard]] const placement& maps() const noexcept;
  /// The same maps in device memory (host memory on the host device), updated in stream order by
  /// commits: phy2log [layers x slots], log2phy [layers x experts x max_replicas()] padded with -1,
  /// replica counts [layers x experts]; int32, eplb's own or the engine's (nullptr for a map the
  /// engine gave as int64: eplb writes that one).
  [[nodiscard]] const std::int32_t* device_phy2log() const noexcept;
  [[nodiscard]] const std::int32_t* device_log2phy() const noexcept;
  [[nodiscard]] const std::int32_t* device_replica_count() const noexcept;
  [[nodiscard]] int device_max_replicas() const noexcept;
  /// This rank's load per physical slot (layers x slots) over the window the latest rebalance
  /// planned from (what step() read back; record_load() counts included); zeros before the first.
  [[nodiscard]] const matrix<std::int64_t>& window_load() const noexcept;
  /// The summed load of every rank per layer and logical expert (layers x experts) over the window
  /// the latest planned rebalance used: the load all-reduce's result, the same on every rank (no
  /// collective of its own); empty before the first rebalance plans.
  [[nodiscard]] const matrix<double>& global_window_load() const noexcept;
  [[nodiscard]] const metrics& stats() const noexcept;
  /// The last config::history_size rebalances that ended on this rank, oldest first.
  [[nodiscard]] std::vector<rebalance_record> history() const;
  /// This rank's metrics in Prometheus text exposition format 0.0.4, every sample labelled
  /// rank="N", names starting with `prefix` (an engine's /metrics handler returns it, or appends
  /// it to its own): rebalances by outcome, layers and bytes moved, the last rebalance's
  /// balancedness, reserved memory, and histograms of rebalance duration and of step()'s host time.
  /// Call it from the serving thread (or between steps). errc::invalid_argument for a prefix
  /// that is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*).
  [[nodiscard]] std::string prometheus_text(std::string_view prefix = "eplb") const;
  [[nodiscard]] comm::backend communicator_kind() const noexcept;
  /// This rank's place in the current rank set, and the set's size (they change with rescale()).
  [[nodiscard]] int rank() const noexcept;
  [[nodiscard]] int num_ranks() const noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace eplb

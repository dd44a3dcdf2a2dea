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
#include <string_view>

#include "eplb/comm/communicator.hpp"
#include "eplb/config.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/device/device.hpp"
#include "eplb/exec/model.hpp"
#include "eplb/export.hpp"

namespace eplb {

/// Async mode commits at most this many layers in one step, bounding the host time of a step.
inline constexpr int max_commits_per_step = 2;

struct model_desc {
  exec::model_shape shape;  ///< layers, experts, slots (experts + redundant), ranks, bundle
  int num_groups = 1;       ///< expert groups (group-limited routing)
  int num_nodes = 1;
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
  std::function<void(std::string_view)> log;  ///< balancedness lines; default: stderr on rank 0
};

struct metrics {
  std::int64_t steps = 0;
  std::int64_t rebalances = 0;
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
};

struct step_report {
  bool rebalance_started = false;
  bool rebalance_finished = false;
  bool rebalance_skipped = false;  ///< finished without moving: the placement was not better enough
  int layers_committed = 0;        ///< in this step
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

  /// The per-step load buffer: layers x physical slots of int64 token counts, device memory on CUDA
  /// (host memory on the host device). The engine's router increments it; step() drains it.
  [[nodiscard]] std::int64_t* load_buffer() const noexcept;
  /// Adds counts (one per physical slot) for `layer` to the current step, from the host.
  void record_load(int layer, std::span<const std::int64_t> counts);

  /// Once per forward step on every rank. Dummy steps count as steps but add no load.
  step_report step(bool is_dummy = false);

  /// Cancels a rebalance in flight, waits for in-flight transfers and device work (bounded by the
  /// timeout) and frees buffers. Idempotent, never throws; step() must not be called afterwards.
  void stop() noexcept;

  /// Maps as the serving loop sees them (committed layers only).
  [[nodiscard]] const placement& maps() const noexcept;
  /// The same maps in device memory (host memory on the host device), updated in stream order by
  /// commits: phy2log [layers x slots], log2phy [layers x experts x max_replicas()] padded with -1,
  /// replica counts [layers x experts]; all int32.
  [[nodiscard]] const std::int32_t* device_phy2log() const noexcept;
  [[nodiscard]] const std::int32_t* device_log2phy() const noexcept;
  [[nodiscard]] const std::int32_t* device_replica_count() const noexcept;
  [[nodiscard]] int device_max_replicas() const noexcept;
  [[nodiscard]] const metrics& stats() const noexcept;
  [[nodiscard]] comm::backend communicator_kind() const noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace eplb

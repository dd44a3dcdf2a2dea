// EPLB configuration: defaults as in vLLM unless noted, validation with errors that name the field,
// the value and what is allowed, and the communicator auto-selection.
#pragma once

#include <chrono>
#include <cstddef>
#include <string>
#include <string_view>

#include "eplb/comm/communicator.hpp"
#include "eplb/core/policy.hpp"
#include "eplb/error.hpp"
#include "eplb/export.hpp"

namespace eplb {

/// Every timeout eplb accepts (config timeout_ms, the `eplb` command's --timeout-ms) lies in
/// [min_timeout, max_timeout] = 1 ms .. 24 h (86,400,000 ms). Deadlines are steady_clock::now() +
/// timeout in nanoseconds: far larger timeouts overflow that arithmetic, and none is meaningful.
inline constexpr std::chrono::milliseconds min_timeout{1};
inline constexpr std::chrono::milliseconds max_timeout{86'400'000};

/// Throws error(code) naming `field`, the value and the allowed range when `timeout` is outside
/// [min_timeout, max_timeout].
EPLB_API void check_timeout(std::string_view field, std::chrono::milliseconds timeout,
                            errc code = errc::invalid_config);

struct EPLB_API config {
  int window_size = 1000;         ///< steps of load kept in the window (> 0)
  int step_interval = 3000;       ///< steps between rebalances (> 0); the first after a quarter
  int num_redundant_experts = 0;  ///< extra physical slots per layer (>= 0)
  bool log_balancedness = false;
  int log_balancedness_interval = 1;          ///< > 0
  bool use_async = false;                     ///< stage on a background thread, commit at step boundaries
  bool elastic = false;                       ///< elastic EP (ranks may join or leave)
  std::string policy = "default";             ///< "default" (more later)
  std::string communicator = "auto";          ///< auto | nccl | gloo | stateless_nccl | cuda_ipc | loopback
  std::size_t staging_bytes = 0;              ///< cap on staging memory; 0 = one layer (eplb default)
  std::chrono::milliseconds timeout{60'000};  ///< every wait of a rebalance; min_timeout..max_timeout
  /// Async, built-in agreement: layers every rank has staged by step k are committed at step
  /// k + this (0..1000). The CPU all-reduce runs in the background meanwhile, so step() waits on the
  /// network only if one round takes longer than this many steps (eplb default).
  int commit_lag_steps = 8;
  /// Sync mode: the staging buffers are registered memory of the communicator, so that nccl moves
  /// bytes between ranks' buffers without its own (rearrange_options::register_buffers: needs a
  /// staging cap of 0 or at least one layer). Every rank must set it alike. Not with use_async.
  bool register_buffers = false;
  /// A rebalance is carried out only when its placement's balancedness for the window (of the
  /// summed load of every rank) exceeds the current maps' by more than this; otherwise it moves
  /// nothing and is reported as skipped. 0: strictly better (eplb default); -1: always (vLLM).
  /// In -1..1.
  double min_improvement = 0.0;
  /// Allocate everything a rebalance uses when the state is made (eplb_state::reserve()), and keep
  /// every rebalance within it: a rank packs its sends of one layer only while they fit its staging
  /// rows' worth (the pairs beyond go as one message per tensor), so that no rebalance allocates
  /// (with register_buffers, whose messages are all packed, a larger layer still grows it). Every
  /// rank must set it alike.
  bool reserve_memory = false;
  /// Rebalance records eplb_state::history() keeps (1..100000; eplb default).
  int history_size = 64;

  /// Throws error(errc::invalid_config) naming the first bad field, its value and what is allowed.
  void validate() const;
  /// The communicator to use: the named one, or for "auto": async -> gloo, elastic ->
  /// stateless_nccl, else nccl. Async mode with an NCCL backend is an error: NCCL kernels launched from a
  /// second thread collide with the serving loop's own NCCL and all-to-all kernels and hang.
  [[nodiscard]] comm::backend resolved_communicator() const;
  [[nodiscard]] policy_kind resolved_policy() const;

  /// Parses a JSON object whose keys are the fields above (timeout as "timeout_ms"); unknown keys,
  /// wrong types and invalid values are error(errc::invalid_config) naming the key.
  [[nodiscard]] static config from_json(std::string_view text);
};

}  // namespace eplb

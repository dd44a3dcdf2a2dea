// The rebalance coroutine: one per rebalance, on the io_context of background_threads. It gathers
// the load (CPU collective, on the blocking pool), computes the placement, then stages layer after
// layer on the side stream into a ring of staging areas, awaiting device events and transfers
// without blocking the io thread (completions are posted back to it). The serving thread commits
// staged layers and hands their areas back.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "eplb/core/load.hpp"
#include "eplb/core/policy.hpp"
#include "eplb/exec/rearrange.hpp"
#include "runtime/background_threads.hpp"
#include "runtime/cpu_group.hpp"

namespace eplb::runtime {

struct rebalance_inputs {
  matrix<double> local_load;  ///< this rank's logical load over the window (layers x experts)
  matrix<expert_id> old_map;
  policy_kind policy;
  int num_groups;
  int num_nodes;
  /// Runs on a blocking-pool thread right after the load all-reduce, before any transfer (e.g.
  /// makes the communicator again after a failed rebalance); its error fails the rebalance.
  std::function<void()> prepare;
  /// Runs on the io thread once the policy has planned `next` from the global load: false makes the
  /// rebalance move nothing (every layer is staged unchanged) and skipped() true. Empty: accepted.
  std::function<bool(const matrix<double>& total, const matrix<expert_id>& old, const matrix<expert_id>& next)> accept;
};

struct ready_layer {
  exec::staged_layer staged;
  int area = -1;        ///< which staging area holds it
  device::event ready;  ///< side-stream work that filled the area
};

class async_runtime {
 public:
  /// `stager` stages on the side stream; `areas` staging areas of stager.layer_area_bytes() each.
  /// Runs on `threads` (its io_context and pool), which must outlive this runtime. With a caller-run
  /// io_context (tests), stop() runs it until the rebalance has ended.
  async_runtime(background_threads& threads, exec::rearranger& stager, const exec::rank_weights& weights,
                cpu_group& group, device::device& dev, device::stream& side, int areas,
                std::chrono::milliseconds timeout);
  ~async_runtime();  // stop()
  async_runtime(const async_runtime&) = delete;
  async_runtime& operator=(const async_runtime&) = delete;

  /// Starts a rebalance (one at a time: errc::internal while one runs). Returns at once.
  void start(rebalance_inputs in);
  /// The serving side gave the current rebalance up (a failure here or on a peer): it ends at its
  /// next check or area wait instead of staging on. No effect on a later start().
  void cancel();
  /// Waits until no rebalance runs (a cancelled one ends once its current transfer or device wait
  /// completes, each bounded by the timeout); false if `limit` passes first.
  [[nodiscard]] bool wait_idle(std::chrono::milliseconds limit);
  /// Layers 0..n-1 of the current rebalance that are staged and not yet taken.
  [[nodiscard]] int staged_layers() const noexcept { return staged_.load(std::memory_order_acquire); }
  /// The staged layer `layer` (< staged_layers()).
  [[nodiscard]] ready_layer get(int layer) const;
  /// The area of a committed layer may be reused once `consumed` completes.
  void release(int area, device::event consumed);
  /// The placement the current rebalance moves to (set once the policy ran), and the global load.
  [[nodiscard]] std::optional<matrix<expert_id>> target() const;
  [[nodiscard]] std::optional<matrix<double>> global_load() const;
  /// The failure of the current rebalance, if any; cleared by start().
  [[nodiscard]] std::exception_ptr failure() const;
  [[nodiscard]] bool busy() const noexcept { return busy_.load(std::memory_order_acquire); }
  /// The current rebalance's plan was not accepted (rebalance_inputs::accept): it moves nothing.
  [[nodiscard]] bool skipped() const noexcept { return skipped_.load(std::memory_order_acquire); }
  [[nodiscard]] std::byte* area(int i) const { return areas_[static_cast<std::size_t>(i)].data(); }
  [[nodiscard]] double plan_seconds() const noexcept { return plan_seconds_.load(); }
  [[nodiscard]] double stage_seconds() const noexcept { return stage_seconds_.load(); }

  /// Cancels the rebalance and waits until it has ended and every handler this runtime posted has
  /// run (its current transfer, blocking job or device wait is bounded by the timeout), then for the
  /// side stream (at most 100 ms: the areas are released after its work anyway). Idempotent, never
  /// throws; nothing but the destructor after it.
  void stop() noexcept;
  /// `reader` (the serving stream) reads committed areas: when this runtime goes, the areas are
  /// freed only once `reader` has also passed the work queued on it by now. Never throws.
  void release_areas_after(device::stream& reader) noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
  device::device* dev_;
  std::vector<device::buffer> areas_;  // freed through dev_->release_after(), never under live work
  std::vector<device::event> readers_done_;
  bool readers_unknown_ = false;  // a reader could not record: its work has no known end
  std::atomic<int> staged_{0};
  std::atomic<bool> busy_{false};
  std::atomic<bool> skipped_{false};
  std::atomic<double> plan_seconds_{0};
  std::atomic<double> stage_seconds_{0};
};

}  // namespace eplb::runtime

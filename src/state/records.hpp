// The rebalance records, events and Prometheus metrics of one rank (issue 21): one record is open
// from a rebalance's trigger to its end, filled by the session as the rebalance plans and commits,
// then kept in a bounded history. Everything here runs on the serving thread (step() and stop());
// the async background never touches it, so the hook is called on the serving thread only.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <string>

#include "eplb/core/matrix.hpp"
#include "eplb/exec/rearrange.hpp"
#include "eplb/state.hpp"

namespace eplb::state_detail {

/// Fixed buckets, so that observing a value allocates nothing (it runs in every step()).
template <std::size_t N>
struct histogram {
  std::array<double, N> bounds;  // upper bounds, ascending; +Inf is implicit
  std::array<std::uint64_t, N + 1> counts{};
  double sum = 0;
  std::uint64_t count = 0;

  void observe(double v) noexcept {
    std::size_t i = 0;
    while (i < N && v > bounds[i]) ++i;
    ++counts[i];
    sum += v;
    ++count;
  }
};

/// What prometheus_text() reads besides the records: cumulative over every rebalance.
struct record_totals {
  std::array<std::int64_t, 4> by_outcome{};  // indexed by rebalance_outcome
  std::uint64_t bytes_sent = 0, bytes_received = 0, bytes_same_node = 0, bytes_cross_node = 0;
  histogram<11> rebalance_seconds{{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120}};
  histogram<12> step_seconds{{1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2, 0.1, 1}};
};

class rebalance_records {
 public:
  using emit_fn = std::function<void(const event&)>;
  rebalance_records(int rank, int num_ranks, int history_size, emit_fn on_event,
                    std::function<void(std::string_view)> log);

  /// The rank set changed (rescale): this rank's place and the set's size from now on.
  void set_rank_set(int rank, int num_ranks) noexcept {
    rank_ = rank;
    num_ranks_ = num_ranks;
    generation_ = 0;  // the new set's communicator is its first
  }

  // The serving loop's side (state.cpp).
  void begin(std::int64_t id, std::int64_t step);  ///< a rebalance was triggered
  void started(std::int64_t step);                 ///< it plans in this step
  /// step() threw while a rebalance was open: it failed, ending now or once the session is idle.
  void failed(const std::string& what, bool stopped);
  /// Ends the open record if the session is idle; returns it (for step_report) or nullptr.
  const rebalance_record* end_if_idle(bool idle, bool skipped, std::int64_t step, int generation,
                                      const placement& maps);
  void step_time(double seconds) noexcept { totals_.step_seconds.observe(seconds); }
  void communicator(int generation, std::int64_t step);  ///< an event when it changed
  void emit(event_level level, event_kind kind, std::int64_t step, std::string_view message,
            const rebalance_record* record = nullptr);
  [[nodiscard]] bool open() const noexcept { return open_.has_value(); }
  /// Debug events are formatted only for a hook (the fallback `log` gets info and above).
  [[nodiscard]] bool wants_debug() const noexcept { return static_cast<bool>(on_event_); }

  // The session's side: what the rebalance planned and moved.
  void planned(const matrix<double>& global_load, double before, double ideal, double plan_seconds);
  void ideal(double value) noexcept {
    if (open_) open_->balancedness_ideal = value;
  }
  void plan_seconds(double s) noexcept {
    if (open_) open_->plan_seconds = s;
  }
  void layer(const exec::layer_stats& st, std::int64_t step);
  void layers_without_stats(int n, std::int64_t step);  ///< committed, bytes unknown (a failed batch)
  void commit_seconds(double s) noexcept {
    if (open_) open_->commit_seconds += s;
  }

  [[nodiscard]] const std::deque<rebalance_record>& history() const noexcept { return history_; }
  [[nodiscard]] const record_totals& totals() const noexcept { return totals_; }
  [[nodiscard]] const matrix<double>& last_global_load() const noexcept { return last_global_load_; }

 private:
  int rank_;
  int num_ranks_;
  std::size_t history_size_;
  emit_fn on_event_;
  std::function<void(std::string_view)> log_;
  std::optional<rebalance_record> open_;
  std::optional<matrix<double>> global_load_;  // the open one's, for balancedness_after
  matrix<double> last_global_load_;            // the latest planned one's (global_window_load())
  std::chrono::steady_clock::time_point trigger_time_;
  std::int64_t step_ = 0;
  int generation_ = 0;
  std::deque<rebalance_record> history_;
  record_totals totals_;
};

/// The Prometheus text of one rank (prometheus.cpp).
[[nodiscard]] std::string prometheus_text(std::string_view prefix, int rank, const metrics& m, const record_totals& t,
                                          int generation);

}  // namespace eplb::state_detail

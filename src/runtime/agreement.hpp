// The async path's per-step commit agreement, pipelined: the minimum over ranks of what each rank
// posts at its k-th step of a rebalance is known to every rank at its (k + lag)-th step. The CPU
// all-reduces of a rebalance run in order on a job_chain of the blocking pool, so step() does not
// wait on the network unless one round takes longer than `lag` steps; every rank still decides from
// the same round, hence commits in the same step.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "runtime/blocking_pool.hpp"
#include "runtime/cpu_group.hpp"

namespace eplb::runtime {

class lagged_min {
 public:
  /// `pool` (background_threads::pool()) must outlive this.
  lagged_min(cpu_group& group, blocking_pool& pool, int lag, std::chrono::milliseconds timeout);
  ~lagged_min();  // waits for the rounds already posted (see the .cpp)
  lagged_min(const lagged_min&) = delete;
  lagged_min& operator=(const lagged_min&) = delete;

  /// Starts the rounds of rebalance `id` (the same on every rank) on a fresh job_chain with fresh
  /// failure state. Rounds of an earlier rebalance are forgotten: they finish on their own chain,
  /// on a pool thread of their own (after a failure one may wait out the timeout), so they never
  /// delay the new rounds, which would leave ranks a round apart.
  void begin(std::int64_t id);
  /// Posts this step's value. Returns the minimum of the round posted `lag` steps ago, or nothing
  /// in the first `lag` steps. Rethrows the all-reduce's error (errc::timeout naming a silent rank).
  [[nodiscard]] std::optional<std::int64_t> step(std::int64_t mine);
  /// A failing rank posts `code` for this round and the `lag` rounds its peers post before they
  /// see it, so their all-reduces complete instead of timing out; then forgets every round. Posts
  /// on the calling thread (one store write per round), so that a stopping rank's codes are in the
  /// store before it announces its stop. Never throws.
  void fail_out(std::int64_t code) noexcept;

 private:
  void post(std::int64_t value);

  cpu_group& group_;
  blocking_pool& pool_;
  int lag_;
  std::chrono::milliseconds timeout_;
  std::int64_t id_ = 0;
  std::int64_t next_round_ = 0;
  std::deque<std::future<std::int64_t>> rounds_;
  // Shared with the queued rounds: the first failure (later rounds fail at once with it instead of
  // each waiting out the timeout for the same silent peer).
  struct shared_state {
    std::mutex mutex;
    std::exception_ptr failure;
  };
  std::shared_ptr<shared_state> shared_ = std::make_shared<shared_state>();
  // Chains of earlier rebalances stay in `retired_` until their rounds have run.
  std::vector<std::shared_ptr<job_chain>> retired_;
  std::shared_ptr<job_chain> chain_;
};

}  // namespace eplb::runtime

#include "runtime/agreement.hpp"

#include <fmt/format.h>

#include <utility>

#include "util/fail.hpp"

namespace eplb::runtime {

lagged_min::lagged_min(cpu_group& group, blocking_pool& pool, int lag, std::chrono::milliseconds timeout)
    : group_(group), pool_(pool), lag_(lag), timeout_(timeout), chain_(job_chain::make(pool)) {
  if (lag < 0) fail(errc::invalid_argument, "commit agreement: lag must be >= 0, got {}", lag);
}

// Queued rounds run (peers may be waiting for them) and use group_: waited for here. After a failed
// one the rest of its rebalance fail at once, so each chain is bounded by one timeout.
lagged_min::~lagged_min() {
  chain_->wait_idle();
  for (const auto& c : retired_) c->wait_idle();
}

void lagged_min::begin(std::int64_t id) {
  std::erase_if(retired_, [](const auto& c) { return c->idle(); });
  retired_.push_back(std::exchange(chain_, job_chain::make(pool_)));
  shared_ = std::make_shared<shared_state>();
  id_ = id;
  next_round_ = 0;
  rounds_.clear();
}

void lagged_min::post(std::int64_t value) {
  auto task = std::make_shared<std::packaged_task<std::int64_t()>>(
      [&group = group_, id = id_, round = next_round_++, value, shared = shared_] {
        {
          std::lock_guard lock(shared->mutex);
          if (shared->failure) std::rethrow_exception(shared->failure);
        }
        try {
          return group.allreduce_min(value, id, round);
        } catch (...) {
          std::lock_guard lock(shared->mutex);
          if (!shared->failure) shared->failure = std::current_exception();
          throw;
        }
      });
  auto round = task->get_future();
  chain_->post([task] { (*task)(); });
  rounds_.push_back(std::move(round));  // after post(), which may throw
}

std::optional<std::int64_t> lagged_min::step(std::int64_t mine) {
  post(mine);
  if (rounds_.size() <= static_cast<std::size_t>(lag_)) return std::nullopt;
  auto round = std::move(rounds_.front());
  rounds_.pop_front();
  // The all-reduce has its own deadline; this one only guards against a wedged pool.
  if (round.wait_for(2 * timeout_) != std::future_status::ready) {
    fail(errc::timeout, "commit agreement of rebalance {}: a round did not finish within {} ms", id_,
         (2 * timeout_).count());
  }
  return round.get();
}

void lagged_min::fail_out(std::int64_t code) {
  for (int i = 0; i <= lag_; ++i) post(code);
  rounds_.clear();
}

}  // namespace eplb::runtime

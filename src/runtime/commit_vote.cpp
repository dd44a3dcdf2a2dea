#include "runtime/commit_vote.hpp"

#include <fmt/format.h>

#include "util/fail.hpp"

namespace eplb::runtime {
namespace {

constexpr const char* write_it = "write";

std::string describe(const std::exception_ptr& failure) {
  try {
    std::rethrow_exception(failure);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown error";
  }
}

}  // namespace

commit_vote::commit_vote(std::shared_ptr<comm::store> store, int rank, int size, std::chrono::milliseconds timeout)
    : store_(std::move(store)), rank_(rank), size_(size), timeout_(timeout) {}

void commit_vote::begin(std::int64_t id) {
  if (id_ >= 0) unforgotten_.emplace_back(id_, batch_ + 1);  // an abort writes one batch past the last decided
  id_ = id;
  batch_ = 0;
  aborted_ = false;
}

void commit_vote::forget_previous() noexcept {
  auto earlier = std::exchange(unforgotten_, {});
  if (rank_ != 0) return;
  try {
    for (const auto& [id, batches] : earlier) {
      for (std::int64_t b = 0; b < batches; ++b) {
        store_->erase(fmt::format("sync-vote/{}/{}/ok", id, b));
        store_->erase(fmt::format("sync-vote/{}/{}/decision", id, b));
      }
      store_->erase(fmt::format("sync-vote/{}/ended", id));
    }
  } catch (...) {  // NOLINT(bugprone-empty-catch): a store that fails here fails the next collective too
  }
}

std::string commit_vote::key(const char* what) const {
  return fmt::format("sync-vote/{}/{}/{}", id_, batch_, what);
}

std::string commit_vote::decide(int layer, int chunk, const std::exception_ptr& failure) {
  const auto decision_key = key("decision");
  std::string decision;
  if (failure) {
    decision = store_->set_if_absent(
        decision_key, fmt::format("rank {} failed in layer {} chunk {}: {}", rank_, layer, chunk, describe(failure)));
  } else {
    // The last rank to vote "written" decides it; any failure posted first wins instead.
    if (store_->add(key("ok"), 1) == size_) (void)store_->set_if_absent(decision_key, write_it);
    try {
      decision = store_->get(decision_key, 2 * timeout_);
    } catch (const error& e) {
      if (e.code() != errc::timeout) throw;
      const auto voted = store_->add(key("ok"), 0);
      decision = store_->set_if_absent(
          decision_key, fmt::format("rank {} saw no decision on layer {} chunk {} within {} ms ({} of {} ranks voted)",
                                    rank_, layer, chunk, 2 * timeout_.count(), voted, size_));
    }
  }
  ++batch_;
  return decision == write_it ? std::string() : decision;
}

void commit_vote::abort(const std::string& why) noexcept {
  if (id_ < 0 || aborted_) return;
  try {
    (void)store_->set_if_absent(key("decision"), fmt::format("rank {} stopped: {}", rank_, why));
  } catch (...) {  // NOLINT(bugprone-empty-catch): the peers then decide after their timeout
  }
  aborted_ = true;  // one abort per rebalance; later batches are never reached
}

void commit_vote::settle(std::int64_t id) noexcept {
  try {
    comm::store_barrier(*store_, fmt::format("sync-vote/{}/ended", id), size_, 3 * timeout_);
  } catch (...) {  // NOLINT(bugprone-empty-catch): the rebalance's own error is what gets reported
  }
}

}  // namespace eplb::runtime

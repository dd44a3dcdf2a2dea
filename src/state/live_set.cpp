#include "state/live_set.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {

std::string alive_key(std::int64_t epoch, int rank) {
  return fmt::format("eplb-live-{}/alive-{}", epoch, rank);
}

std::string decision_key(std::int64_t epoch) {
  return fmt::format("eplb-live-{}/decision", epoch);
}

// Short slices, so that a stop request or a decision already made ends the wait early.
constexpr std::chrono::milliseconds slice{20};

// Waits for `rank`'s post until `deadline`; false when it did not come.
bool heard_from(comm::store& store, std::int64_t epoch, int rank, std::chrono::steady_clock::time_point deadline,
                const std::stop_token& stop) {
  for (;;) {
    if (stop.stop_requested()) fail(errc::cancelled, "live-set agreement: stopped");
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    try {
      (void)store.get(alive_key(epoch, rank), std::clamp(left, std::chrono::milliseconds(1), slice));
      return true;
    } catch (const error& e) {
      if (e.code() != errc::timeout) throw;
    }
    if (left <= slice) return false;
  }
}

}  // namespace

std::vector<int> agree_live_set(comm::store& store, std::int64_t epoch, int rank, int size,
                                std::chrono::milliseconds timeout, const std::stop_token& stop) {
  store.set(alive_key(epoch, rank), "1");
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string proposal(static_cast<std::size_t>(size), '0');
  for (int r = 0; r < size; ++r) {
    if (r == rank || heard_from(store, epoch, r, deadline, stop)) proposal[static_cast<std::size_t>(r)] = '1';
  }
  const auto decided = store.set_if_absent(decision_key(epoch), proposal);
  if (decided.size() != static_cast<std::size_t>(size)) {
    fail(errc::internal, "live-set agreement of epoch {}: the decision '{}' is not for {} ranks", epoch, decided, size);
  }
  if (decided[static_cast<std::size_t>(rank)] != '1') {
    fail(errc::peer_failure,
         "rank {} was left out of the live set of epoch {} (it answered after its peers' timeout of {} ms)", rank,
         epoch, timeout.count());
  }
  std::vector<int> live;
  for (int r = 0; r < size; ++r) {
    if (decided[static_cast<std::size_t>(r)] == '1') live.push_back(r);
  }
  return live;
}

}  // namespace eplb::state_detail

#include "state/live_set.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <sstream>

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

live_set agree_live_set(comm::store& store, std::int64_t epoch, int rank, int size, std::int64_t steps,
                        std::int64_t rebalances, std::chrono::milliseconds timeout, const std::stop_token& stop) {
  store.set(alive_key(epoch, rank), fmt::format("{} {}", steps, rebalances));
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
  live_set live;
  for (int r = 0; r < size; ++r) {
    if (decided[static_cast<std::size_t>(r)] != '1') continue;
    live.ranks.push_back(r);
    // Posted before the decision named it: there already.
    std::istringstream posted(store.get(alive_key(epoch, r), timeout));
    std::int64_t their_steps = 0, their_rebalances = 0;
    posted >> their_steps >> their_rebalances;
    live.last_step = std::max(live.last_step, their_steps);
    live.last_rebalance = std::max(live.last_rebalance, their_rebalances);
  }
  return live;
}

matrix<expert_id> owners_view(comm::store& store, std::int64_t epoch, const rescale_plan& plan, int rank,
                              const matrix<expert_id>& mine, std::chrono::milliseconds timeout) {
  const int spr = plan.slots_per_rank;
  const auto key = [epoch](int r) { return fmt::format("eplb-live-{}/slots-{}", epoch, r); };
  std::string own;
  for (std::size_t l = 0; l < mine.rows(); ++l) {
    for (int s = 0; s < spr; ++s) own += fmt::format("{} ", mine(l, static_cast<std::size_t>(rank * spr + s)));
  }
  store.set(key(rank), own);
  matrix<expert_id> out(mine.rows(), static_cast<std::size_t>(plan.new_size * spr), empty_slot);
  for (int r = 0; r < plan.old_size; ++r) {
    const int nr = plan.mapping[static_cast<std::size_t>(r)];
    if (nr < 0) continue;
    std::istringstream theirs(store.get(key(r), timeout));
    for (std::size_t l = 0; l < mine.rows(); ++l) {
      for (int s = 0; s < spr; ++s) {
        if (!(theirs >> out(l, static_cast<std::size_t>(nr * spr + s)))) {
          fail(errc::transport, "recover: rank {}'s slots in the store are malformed", r);
        }
      }
    }
  }
  return out;
}

}  // namespace eplb::state_detail

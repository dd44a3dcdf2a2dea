// Which ranks of a set are still alive, agreed by those that are (eplb_state::recover, issue 20):
// each posts that it is alive, waits for the others up to the timeout, and proposes the ranks it
// heard from; the store's first-writer-wins set_if_absent makes the first proposal the decision
// every rank reads, so all agree even when a slow rank posts after another's deadline (it reads
// a decision without itself and leaves).
#pragma once

#include <chrono>
#include <cstdint>
#include <stop_token>
#include <vector>

#include "eplb/comm/store.hpp"
#include "state/rescale.hpp"

namespace eplb::state_detail {

struct live_set {
  std::vector<int> ranks;           // of 0..size-1, ascending
  std::int64_t last_step = 0;       // the most steps any of them had served: they all go on from there
  std::int64_t last_rebalance = 0;  // the most rebalances any had triggered: ids go on alike
};
/// The ranks of the set at `epoch` that posted within `timeout`, as the first proposal decided,
/// each posting the steps it served and the rebalances it triggered: async ranks learn of a death
/// in different steps, and one may have triggered a rebalance in a step another did not finish.
/// errc::peer_failure when this rank is not among them; errc::cancelled when `stop` is requested.
[[nodiscard]] live_set agree_live_set(comm::store& store, std::int64_t epoch, int rank, int size, std::int64_t steps,
                                      std::int64_t rebalances, std::chrono::milliseconds timeout,
                                      const std::stop_token& stop);

/// The survivors' maps in the new set's order, each rank's slots as that rank holds them: every
/// survivor posts its own slots and reads the others'. A rank is the authority on its own bytes:
/// when a failed async rebalance ended a step apart on two ranks (one committed a layer the other
/// had not yet), their maps differ, but what each slot holds does not.
[[nodiscard]] matrix<expert_id> owners_view(comm::store& store, std::int64_t epoch, const rescale_plan& plan, int rank,
                                            const matrix<expert_id>& mine, std::chrono::milliseconds timeout);

}  // namespace eplb::state_detail

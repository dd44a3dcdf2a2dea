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

namespace eplb::state_detail {

/// The ranks (of 0..size-1, ascending) of the set at `epoch` that posted within `timeout`, as the
/// first proposal decided. errc::peer_failure when this rank is not among them; errc::cancelled
/// when `stop` is requested.
[[nodiscard]] std::vector<int> agree_live_set(comm::store& store, std::int64_t epoch, int rank, int size,
                                              std::chrono::milliseconds timeout, const std::stop_token& stop);

}  // namespace eplb::state_detail

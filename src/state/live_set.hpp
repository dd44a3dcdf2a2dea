// Which ranks of a set arrived at an agreement, and what each posted (eplb_state::rescale and
// recover, issue 20): each posts its arrival, waits for the others up to the timeout, and proposes
// the ranks it heard from; the store's first-writer-wins set_if_absent makes the first proposal
// the decision every rank reads, so all agree even when a slow rank posts after another's deadline
// (it reads a decision without itself).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <stop_token>
#include <string>
#include <vector>

#include "eplb/comm/store.hpp"
#include "eplb/core/placement.hpp"

namespace eplb::state_detail {

/// What a rank posts on arriving: the steps it served, the rebalances it triggered, and what its
/// own slots hold (layers x slots_per_rank). A rank is the authority on its own bytes: when a failed
/// async rebalance ended a step apart on two ranks (one committed a layer the other had not yet),
/// their maps differ, but what each slot holds does not.
struct arrival {
  std::int64_t steps = 0;
  std::int64_t rebalances = 0;
  matrix<expert_id> own_slots;
};
/// This rank's arrival: its counters and its columns of `phy2log`.
[[nodiscard]] arrival arrival_of(std::int64_t steps, std::int64_t rebalances, const matrix<expert_id>& phy2log,
                                 int rank, int slots_per_rank);

struct arrivals {
  std::vector<int> ranks;                    // of 0..size-1 that the decision names, ascending
  std::vector<std::optional<arrival>> post;  // by rank: empty for a rank left out
  [[nodiscard]] bool all() const noexcept { return ranks.size() == post.size(); }
  [[nodiscard]] bool named(int rank) const noexcept {
    return std::find(ranks.begin(), ranks.end(), rank) != ranks.end();
  }
};
/// The ranks of a set of `size` that posted under `space` within `timeout`, as the first proposal
/// decided, with their posts: read only when this rank is among them, and with `only_all` only when
/// every rank is (then a rank may erase its post as soon as it read a partial decision). A decision
/// made already ends the wait. errc::cancelled when `stop` is requested. The posts stay until each rank erases its own
/// (leave_arrivals) once every rank has read them; the decision stays for ranks that come late.
/// `gone(r)`: rank r is known dead (its process gone from this host), so the wait for it ends.
[[nodiscard]] arrivals agree_arrivals(comm::store& store, const std::string& space, int rank, int size,
                                      const arrival& mine, std::chrono::milliseconds timeout,
                                      const std::stop_token& stop, bool only_all = false,
                                      const std::function<bool(int)>& gone = {});

/// Where this rank's process runs, posted for set `epoch`'s numbering, so that a peer's recover()
/// can tell it is gone (peer_gone) instead of waiting out the timeout; erase_identity drops it.
void post_identity(comm::store& store, std::int64_t epoch, int rank);
void erase_identity(comm::store& store, std::int64_t epoch, int rank) noexcept;
/// True for a rank of set `epoch`'s numbering whose posted process ran on this host and has exited;
/// false when that cannot be told (no post, another host or PID namespace). Remembers the posts read.
[[nodiscard]] std::function<bool(int)> peer_gone(comm::store& store, std::int64_t epoch);
/// Erases this rank's post under `space`; never throws.
void leave_arrivals(comm::store& store, const std::string& space, int rank) noexcept;

/// Every slot of the set as its rank posted it (the owners' view); a left-out rank's slots empty.
[[nodiscard]] matrix<expert_id> owners_view(const arrivals& posted, int slots_per_rank);

struct live_set {
  std::vector<int> ranks;           // of 0..size-1, ascending
  std::int64_t last_step = 0;       // the most steps any of them had served: they all go on from there
  std::int64_t last_rebalance = 0;  // the most rebalances any had triggered: ids go on alike
};
/// recover(): the ranks of `posted` (async ranks learn of a death in different steps, and one may
/// have triggered a rebalance in a step another did not finish). errc::peer_failure when this rank
/// is not among them: it answered after its peers' `timeout`.
[[nodiscard]] live_set live_set_of(const arrivals& posted, std::int64_t epoch, int rank,
                                   std::chrono::milliseconds timeout);

}  // namespace eplb::state_detail

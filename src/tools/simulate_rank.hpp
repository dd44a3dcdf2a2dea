// One rank of `eplb simulate`: a serving loop over an eplb_state whose model holds recognisable
// bytes, every committed layer verified; its report says how the rank's run ended.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>

#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "tools/simulate.hpp"

namespace eplb::tools {

/// The loopback worlds of a run's ranks (threads): the first set's, and the survivors' of each
/// size (--survive), one object for every rank.
class loopback_worlds {
 public:
  explicit loopback_worlds(int ranks) : first_(comm::make_loopback_world(ranks)) {}
  [[nodiscard]] const std::shared_ptr<comm::loopback_world>& first() const noexcept { return first_; }
  /// The survivors' (--survive) or the rescaled set's (--scale, by its epoch) world.
  [[nodiscard]] std::shared_ptr<comm::loopback_world> of_size(int size) { return of_set(-1, size); }
  [[nodiscard]] std::shared_ptr<comm::loopback_world> of_set(std::int64_t epoch, int size) {
    std::lock_guard lock(mutex_);
    auto& w = sets_[{epoch, size}];
    if (!w) w = comm::make_loopback_world(size);
    return w;
  }

 private:
  std::shared_ptr<comm::loopback_world> first_;
  std::mutex mutex_;
  std::map<std::pair<std::int64_t, int>, std::shared_ptr<comm::loopback_world>> sets_;
};

/// One rank's run, as a thread sharing `worlds` (loopback) with the other ranks, or on its own
/// (worlds nullptr: the state makes its communicators from the config and the store). The report
/// holds "verified", "failure" (empty when none) and, unless the rank died on purpose, its step
/// times, commits and rebalances; error(...) is caught and reported, never thrown.
[[nodiscard]] nlohmann::json run_rank(const simulate_config& cfg, int rank, std::shared_ptr<comm::store> store,
                                      std::shared_ptr<loopback_worlds> worlds, bool print_progress);

}  // namespace eplb::tools

// One rank of `eplb simulate`: a serving loop over an eplb_state whose model holds recognisable
// bytes, every committed layer verified; its report says how the rank's run ended.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>

#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "tools/simulate.hpp"

namespace eplb::tools {

/// One rank's run, as a thread sharing `world` (loopback) with the other ranks, or on its own
/// (world nullptr: the state makes its communicators from the config and the store). The report
/// holds "verified", "failure" (empty when none) and, unless the rank died on purpose, its step
/// times, commits and rebalances; error(...) is caught and reported, never thrown.
[[nodiscard]] nlohmann::json run_rank(const simulate_config& cfg, int rank, std::shared_ptr<comm::store> store,
                                      std::shared_ptr<comm::loopback_world> world, bool print_progress);

}  // namespace eplb::tools

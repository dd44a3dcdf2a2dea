// The time series of `eplb simulate --report`, merged from the ranks' load samples: global
// balancedness (vLLM's: per layer mean / max of the ranks' loads, averaged over layers), each
// rank's load relative to the mean, and the worst layer's per-rank load around each rebalance.
#pragma once

#include <nlohmann/json.hpp>
#include <vector>

namespace eplb::tools {

/// {"steps", "global_balancedness", "rank_share" [rank][sample], "worst_layers" [{rebalance,
/// layer, before, after}]}; null when no rank recorded samples.
[[nodiscard]] nlohmann::json merge_series(const std::vector<nlohmann::json>& ranks,
                                          const nlohmann::json& rebalance_log);

}  // namespace eplb::tools

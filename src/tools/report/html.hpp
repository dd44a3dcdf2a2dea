// `eplb simulate --report FILE.html`: one self-contained page (inline SVG and CSS, no scripts, no
// network) with the run's balancedness over the steps, rebalances marked by outcome, the worst
// layer's per-rank load before and after each rebalance, bytes moved and step-time percentiles.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "tools/simulate.hpp"

namespace eplb::tools {

/// The page for a merged report (merge_reports) that holds "series".
[[nodiscard]] std::string html_report(const simulate_config& cfg, const nlohmann::json& report);

}  // namespace eplb::tools

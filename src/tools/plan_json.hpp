// `eplb plan`: JSON request in, placement out. Kept apart from main() so tests and fuzzers reach it.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>

#include "eplb/core/matrix.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/core/policy.hpp"

namespace eplb::tools {

struct plan_request {
  matrix<double> load;
  int num_replicas = 0;
  int num_groups = 0;
  int num_nodes = 0;
  int num_ranks = 0;
  std::optional<placement> old;
  policy_kind policy = policy_kind::deepseek_default;
};

/// Parses and validates a request; throws eplb::error (invalid_json or invalid_argument/invalid_map)
/// whose message names the field and the rule.
[[nodiscard]] plan_request parse_plan_request(const nlohmann::json& doc);
/// Parses text first (errc::invalid_json when it is not JSON).
[[nodiscard]] plan_request parse_plan_text(std::string_view text);

struct plan_result {
  placement after;
  std::optional<double> balancedness_before;
  double balancedness_after = 0.0;
  std::int64_t moved_experts = 0;
};

[[nodiscard]] plan_result run_plan(const plan_request& request);
[[nodiscard]] nlohmann::json to_json(const plan_result& result);
/// A readable per-layer, per-rank rendering for people.
[[nodiscard]] std::string to_text(const plan_request& request, const plan_result& result);

}  // namespace eplb::tools

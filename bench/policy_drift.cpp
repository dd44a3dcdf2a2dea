// Replays a drifting load (50 rebalances of a DeepSeek-V3-sized model: 58 layers x 256 experts ->
// 288 slots, 8 groups, 4 nodes, 32 ranks) through the default and the min_move policies, each
// starting from vLLM's initial placement and following its own placements. Prints the slots moved
// per rebalance and the balancedness reached, per policy, and their ratios.
#include <fmt/format.h>

#include <cmath>
#include <random>

#include "eplb/core/load.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/core/policy.hpp"

int main(int argc, char** argv) {
  using namespace eplb;
  const int layers = 58, experts = 256, slots = 288, groups = 8, nodes = 4, ranks = 32;
  const int rebalances = argc > 1 ? std::atoi(argv[1]) : 50;
  std::mt19937_64 rng(17);
  // Per-expert popularity follows a multiplicative random walk: hot experts cool down, others heat up.
  matrix<double> popularity(layers, experts);
  for (auto& v : popularity.flat()) v = std::exp(std::normal_distribution<double>(0, 0.8)(rng));
  const auto start = placement::initial(layers, experts, slots, ranks).phy2log();
  matrix<expert_id> current[2] = {start, start};
  const policy_kind kinds[2] = {policy_kind::deepseek_default, policy_kind::min_move};
  double moved_sum[2] = {0, 0}, balance_sum[2] = {0, 0};
  for (int r = 0; r < rebalances; ++r) {
    for (auto& v : popularity.flat()) v *= std::exp(std::normal_distribution<double>(0, 0.1)(rng));
    matrix<double> load(layers, experts);
    for (std::size_t i = 0; i < load.flat().size(); ++i) load.flat()[i] = std::floor(1000 * popularity.flat()[i]);
    for (int k = 0; k < 2; ++k) {
      auto next = rebalance(kinds[k], {load, slots, groups, nodes, ranks, &current[k]});
      moved_sum[k] += static_cast<double>(moved_slots(current[k], next));
      balance_sum[k] += balancedness(placement(next, experts, ranks), load);
      current[k] = std::move(next);
    }
  }
  const double per_default = moved_sum[0] / rebalances, per_min = moved_sum[1] / rebalances;
  const double bal_default = balance_sum[0] / rebalances, bal_min = balance_sum[1] / rebalances;
  fmt::print("| policy | slots moved per rebalance (of {}) | mean balancedness |\n|---|---|---|\n", layers * slots);
  fmt::print("| default | {:.1f} | {:.4f} |\n| min_move | {:.1f} | {:.4f} |\n", per_default, bal_default, per_min,
             bal_min);
  fmt::print("\nmin_move / default: moves {:.3f}x, balancedness {:.4f}x ({} rebalances)\n", per_min / per_default,
             bal_min / bal_default, rebalances);
  return 0;
}

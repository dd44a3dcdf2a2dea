// Time of the default policy on a DeepSeek-V3-sized problem: 58 layers x 256 experts -> 288 slots,
// 8 groups, 4 nodes, 32 ranks, old placement given (the shape vLLM's numpy policy takes 87 ms on).
#include <benchmark/benchmark.h>

#include <cmath>
#include <random>

#include "eplb/core/placement.hpp"
#include "eplb/core/policy.hpp"

namespace {

struct problem {
  int layers, experts, replicas, groups, nodes, ranks;
  eplb::matrix<double> load;
  eplb::matrix<eplb::expert_id> old;
};

problem make_problem(int layers, int experts, int replicas, int groups, int nodes, int ranks) {
  problem p{layers, experts, replicas, groups, nodes, ranks, {}, {}};
  std::mt19937_64 rng(7);
  p.load = eplb::matrix<double>(layers, experts);
  for (auto& v : p.load.flat()) v = std::floor(std::exp(std::uniform_real_distribution<double>(4, 12)(rng)));
  // The old placement is what the policy itself chose for a different load: a realistic start.
  eplb::matrix<double> previous(layers, experts);
  for (auto& v : previous.flat()) v = std::floor(std::exp(std::uniform_real_distribution<double>(4, 12)(rng)));
  p.old = eplb::rebalance_default({previous, replicas, groups, nodes, ranks});
  return p;
}

void run(benchmark::State& state, const problem& p) {
  for (auto _ : state) {
    auto out = eplb::rebalance_default({p.load, p.replicas, p.groups, p.nodes, p.ranks, &p.old});
    benchmark::DoNotOptimize(out);
  }
}

void BM_default_policy_deepseek_v3(benchmark::State& state) {
  static const problem p = make_problem(58, 256, 288, 8, 4, 32);
  run(state, p);
}
BENCHMARK(BM_default_policy_deepseek_v3)->Unit(benchmark::kMicrosecond);

void BM_default_policy_deepseek_v3_global(benchmark::State& state) {
  static const problem p = make_problem(58, 256, 288, 1, 1, 32);  // decode-style global balancing
  run(state, p);
}
BENCHMARK(BM_default_policy_deepseek_v3_global)->Unit(benchmark::kMicrosecond);

void BM_default_policy_qwen3_30b(benchmark::State& state) {
  static const problem p = make_problem(48, 128, 144, 1, 1, 8);
  run(state, p);
}
BENCHMARK(BM_default_policy_qwen3_30b)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();

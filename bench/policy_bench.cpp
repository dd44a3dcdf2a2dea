// Time of the default policy on a DeepSeek-V3-sized problem: 58 layers x 256 experts -> 288 slots,
// 8 groups, 4 nodes, 32 ranks, old placement given (the shape vLLM's numpy policy takes 87 ms on);
// of min_move on it; and of both on the shapes that were quadratic or worse (issue 15 item 8).
#include <benchmark/benchmark.h>

#include <cmath>
#include <map>
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

void run(benchmark::State& state, const problem& p, eplb::policy_kind kind = eplb::policy_kind::deepseek_default) {
  for (auto _ : state) {
    auto out = eplb::rebalance(kind, {p.load, p.replicas, p.groups, p.nodes, p.ranks, &p.old});
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

void BM_min_move_deepseek_v3(benchmark::State& state) {
  static const problem p = make_problem(58, 256, 288, 8, 4, 32);
  run(state, p, eplb::policy_kind::min_move);
}
BENCHMARK(BM_min_move_deepseek_v3)->Unit(benchmark::kMillisecond);

void BM_min_move_deepseek_v3_global(benchmark::State& state) {
  static const problem p = make_problem(58, 256, 288, 1, 1, 32);
  run(state, p, eplb::policy_kind::min_move);
}
BENCHMARK(BM_min_move_deepseek_v3_global)->Unit(benchmark::kMillisecond);

// Slot preservation on one rank was O(slots^2) (200,000 slots: 16.6 s; now over the limit).
void BM_default_policy_one_rank_65536_slots(benchmark::State& state) {
  static const problem p = make_problem(1, 256, 65536, 1, 1, 1);
  run(state, p);
}
BENCHMARK(BM_default_policy_one_rank_65536_slots)->Unit(benchmark::kMillisecond);

// Packing was O(items x packs) (1,000,000 slots over 500,000 ranks: 425 s; now over the limit).
void BM_default_policy_4096_ranks_65536_slots(benchmark::State& state) {
  static const problem p = make_problem(1, 256, 65536, 1, 1, 4096);
  run(state, p);
}
BENCHMARK(BM_default_policy_4096_ranks_65536_slots)->Unit(benchmark::kMillisecond);

// min_move on 2,048 experts -> 4,096 slots of one node took 2.6 s (8 ranks) to 102 s (4,096 ranks).
void BM_min_move_2048_experts_4096_slots(benchmark::State& state) {
  static std::map<int, problem> problems;
  const auto ranks = static_cast<int>(state.range(0));
  if (!problems.contains(ranks)) problems.emplace(ranks, make_problem(1, 2048, 4096, 1, 1, ranks));
  run(state, problems.at(ranks), eplb::policy_kind::min_move);
}
BENCHMARK(BM_min_move_2048_experts_4096_slots)->Arg(8)->Arg(512)->Arg(4096)->Unit(benchmark::kMillisecond);

// The largest total check_limits allows: 1,024 layers x 4,096 slots.
void BM_largest_shape(benchmark::State& state) {
  static const problem p = make_problem(1024, 4096, 4096, 1, 1, 64);
  run(state, p, state.range(0) == 0 ? eplb::policy_kind::deepseek_default : eplb::policy_kind::min_move);
}
BENCHMARK(BM_largest_shape)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->Iterations(1);

}  // namespace

BENCHMARK_MAIN();

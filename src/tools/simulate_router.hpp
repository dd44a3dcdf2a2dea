// The token router of `eplb simulate`: a Zipf load over a permutation of the experts that changes
// every drift_steps steps, the same hot experts on every rank, spread over an expert's replicas as
// vLLM's router does (token index modulo the replica count).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "eplb/core/placement.hpp"
#include "tools/simulate.hpp"

namespace eplb::tools {

/// Routes one rank's tokens for one layer and step; counts per physical slot of the maps.
class router {
 public:
  router(const simulate_config& cfg, int layers, int experts, int rank)
      : cfg_(cfg), layers_(layers), experts_(experts), rng_(cfg.seed * 1315423911ULL + static_cast<unsigned>(rank)) {}

  std::vector<std::int64_t> route(int layer, int step, const placement& maps) {
    const int phase = step / cfg_.drift_steps;
    auto& dist = distribution(layer, phase);
    std::vector<std::int64_t> counts(static_cast<std::size_t>(maps.num_physical()), 0);
    for (int t = 0; t < cfg_.tokens_per_step; ++t) {
      int e = dist(rng_);
      // A masked expert (lost with a rank, not reloaded) gets no token: the engine masks its logit,
      // so the token goes to another expert (here the next one with a replica).
      while (maps.replica_count(layer, e) == 0) e = (e + 1) % experts_;
      const int replicas = maps.replica_count(layer, e);
      const int slot = maps.log2phy(layer, e)[static_cast<std::size_t>(t % replicas)];  // vLLM: index % count
      ++counts[static_cast<std::size_t>(slot)];
    }
    return counts;
  }

 private:
  std::discrete_distribution<int>& distribution(int layer, int phase) {
    const auto key = std::make_pair(layer, phase);
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    if (cache_.size() > static_cast<std::size_t>(4 * layers_)) cache_.clear();
    // The same hot experts on every rank: the permutation depends on the seed, layer and phase only.
    std::mt19937_64 perm_rng(cfg_.seed * 7919 + static_cast<std::uint64_t>(layer) * 104729 +
                             static_cast<std::uint64_t>(phase));
    std::vector<int> order(static_cast<std::size_t>(experts_));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), perm_rng);
    std::vector<double> w(static_cast<std::size_t>(experts_));
    for (int i = 0; i < experts_; ++i)
      w[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = 1.0 / std::pow(i + 1.0, cfg_.zipf);
    return cache_.emplace(key, std::discrete_distribution<int>(w.begin(), w.end())).first->second;
  }

  const simulate_config& cfg_;
  int layers_, experts_;
  std::mt19937_64 rng_;
  std::map<std::pair<int, int>, std::discrete_distribution<int>> cache_;
};

}  // namespace eplb::tools

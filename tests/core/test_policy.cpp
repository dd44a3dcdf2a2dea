#include <doctest/doctest.h>

#include <algorithm>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include "check_error.hpp"
#include "eplb/core/load.hpp"
#include "eplb/core/policy.hpp"

using namespace eplb;

namespace {

matrix<double> load_of(const std::vector<std::vector<double>>& rows) {
  matrix<double> m(rows.size(), rows[0].size());
  for (std::size_t l = 0; l < rows.size(); ++l) std::copy(rows[l].begin(), rows[l].end(), m.row(l).begin());
  return m;
}

std::vector<int> row_vec(const matrix<expert_id>& m, std::size_t l) {
  return {m.row(l).begin(), m.row(l).end()};
}

// A literal, slow rendering of DeepSeek's algorithm (linear argmin/argmax scans, sequential float32
// group sums, no heap), used to cross-check the optimised policy on random inputs with ties.
struct reference_policy {
  static void pack(const std::vector<double>& w, int packs, std::vector<int>& pack_of, std::vector<int>& rank_of) {
    const int n = static_cast<int>(w.size());
    const int per = n / packs;
    pack_of.assign(n, 0);
    rank_of.assign(n, 0);
    if (per == 1) {
      std::iota(pack_of.begin(), pack_of.end(), 0);
      return;
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return w[a] > w[b]; });
    std::vector<double> pw(packs, 0.0);
    std::vector<int> cnt(packs, 0);
    for (int item : order) {
      int best = -1;
      for (int k = 0; k < packs; ++k) {
        if (cnt[k] < per && (best < 0 || pw[k] < pw[best])) best = k;
      }
      pack_of[item] = best;
      rank_of[item] = cnt[best]++;
      pw[best] += w[item];
    }
  }

  static std::vector<int> run(const std::vector<float>& w, int replicas, int groups, int nodes, int gpus) {
    const int experts = static_cast<int>(w.size());
    const int gs = experts / groups;
    std::vector<double> gload(groups);
    for (int g = 0; g < groups; ++g) {
      float s = 0;  // exact for the small integer loads the cross-check uses
      for (int i = 0; i < gs; ++i) s += w[g * gs + i];
      gload[g] = s;
    }
    std::vector<int> gp, gr;
    pack(gload, nodes, gp, gr);
    std::vector<int> node_experts_order(experts);  // mlog -> log
    for (int e = 0; e < experts; ++e)
      node_experts_order[(gp[e / gs] * (groups / nodes) + gr[e / gs]) * gs + e % gs] = e;
    const int epn = experts / nodes, rpn = replicas / nodes, per_gpu = replicas / gpus;
    std::vector<int> out(replicas);
    for (int n = 0; n < nodes; ++n) {
      std::vector<int> phy(rpn), cnt(epn, 1);
      for (int i = 0; i < epn; ++i) phy[i] = i;
      for (int i = epn; i < rpn; ++i) {
        int best = 0;
        for (int m = 1; m < epn; ++m) {
          const double a = double(w[node_experts_order[n * epn + m]]) / cnt[m];
          const double b = double(w[node_experts_order[n * epn + best]]) / cnt[best];
          if (a > b) best = m;
        }
        phy[i] = best;
        ++cnt[best];
      }
      std::vector<double> per(rpn);
      for (int i = 0; i < rpn; ++i) per[i] = double(w[node_experts_order[n * epn + phy[i]]]) / cnt[phy[i]];
      std::vector<int> pk, rk;
      pack(per, gpus / nodes, pk, rk);
      for (int i = 0; i < rpn; ++i) out[n * rpn + pk[i] * per_gpu + rk[i]] = node_experts_order[n * epn + phy[i]];
    }
    return out;
  }
};

}  // namespace

TEST_CASE("DeepSeek README example gives vLLM's phy2log") {
  const auto load = load_of(
      {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86}, {20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27}});
  const auto out = rebalance_default({load, 16, 4, 2, 8});
  CHECK(row_vec(out, 0) == std::vector<int>{5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1});
  CHECK(row_vec(out, 1) == std::vector<int>{7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1});
  placement p(out, 12, 8);
  // vLLM's expected replica counts for this example.
  const std::vector<int> cnt0{1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1};
  const std::vector<int> cnt1{1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1};
  CHECK(std::vector<int>(p.replica_counts().row(0).begin(), p.replica_counts().row(0).end()) == cnt0);
  CHECK(std::vector<int>(p.replica_counts().row(1).begin(), p.replica_counts().row(1).end()) == cnt1);
}

TEST_CASE("global balancing when groups do not divide over nodes") {
  // 3 groups, 2 nodes -> global: replicate over all experts, pack over all ranks.
  const auto load = load_of({{100, 1, 1, 1, 1, 1}});
  const auto out = rebalance_default({load, 8, 3, 2, 4});
  placement p(out, 6, 4);
  CHECK(p.replica_count(0, 0) == 3);  // the hot expert takes both extra slots
  for (int r = 0; r < 4; ++r) {       // its replicas land on three different ranks (each pack is the lightest)
    int hot = 0;
    for (int s = 0; s < 2; ++s) hot += out(0, r * 2 + s) == 0;
    CHECK(hot <= 1);
  }
}

TEST_CASE("one rank without redundancy orders its slots heaviest first") {
  const auto load = load_of({{3, 1, 2}});
  CHECK(row_vec(rebalance_default({load, 3, 1, 1, 1}), 0) == std::vector<int>{0, 2, 1});
}

TEST_CASE("equal loads replicate nothing twice and tie-break by lower index") {
  const auto load = load_of({{5, 5, 5, 5}});
  const auto out = rebalance_default({load, 6, 1, 1, 2});
  placement p(out, 4, 2);
  // Extra replicas go to experts 0 and 1 (first argmax each time).
  CHECK(p.replica_count(0, 0) == 2);
  CHECK(p.replica_count(0, 1) == 2);
  CHECK(p.replica_count(0, 2) == 1);
}

TEST_CASE("slot preservation keeps kept experts in their old slots") {
  const auto load = load_of({{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86}});
  const auto fresh = rebalance_default({load, 16, 4, 2, 8});
  // Old placement: the fresh one with each rank's two slots swapped.
  matrix<expert_id> old = fresh;
  for (int r = 0; r < 8; ++r) std::swap(old(0, 2 * r), old(0, 2 * r + 1));
  const auto kept = rebalance_default({load, 16, 4, 2, 8, &old});
  CHECK(kept == old);
  CHECK(moved_slots(old, kept) == 0);
}

TEST_CASE("rebalance input validation names the field") {
  const auto load = load_of({{1, 2, 3, 4}});
  CHECK_EPLB_ERROR(rebalance_default({load, 3, 1, 1, 1}), errc::invalid_argument, "num_replicas: 3 is fewer");
  CHECK_EPLB_ERROR(rebalance_default({load, 6, 1, 1, 4}), errc::invalid_argument,
                   "num_replicas: 6 is not divisible by num_ranks 4");
  CHECK_EPLB_ERROR(rebalance_default({load, 8, 3, 1, 4}), errc::invalid_argument,
                   "num_groups: 3 does not divide the 4 logical experts");
  CHECK_EPLB_ERROR(rebalance_default({load, 8, 2, 2, 3}), errc::invalid_argument,
                   "num_replicas: 8 is not divisible by num_ranks 3");
  CHECK_EPLB_ERROR(rebalance_default({load, 12, 2, 2, 3}), errc::invalid_argument,
                   "num_nodes: 2 does not divide num_ranks 3");
  CHECK_EPLB_ERROR(rebalance_default({load, 4, 0, 1, 1}), errc::invalid_argument, "num_groups: must be > 0");
  CHECK_EPLB_ERROR(rebalance_default({load, 4, 1, 0, 1}), errc::invalid_argument, "num_nodes: must be > 0");
  CHECK_EPLB_ERROR(rebalance_default({load, 4, 1, 1, 0}), errc::invalid_argument, "num_ranks: must be > 0");
  auto bad = load;
  bad(0, 2) = -1;
  CHECK_EPLB_ERROR(rebalance_default({bad, 4, 1, 1, 1}), errc::invalid_argument, "load[0][2]: must be a finite");
  bad(0, 2) = std::numeric_limits<double>::quiet_NaN();
  CHECK_EPLB_ERROR(rebalance_default({bad, 4, 1, 1, 1}), errc::invalid_argument, "load[0][2]");
  bad(0, 2) = 1e300;
  CHECK_EPLB_ERROR(rebalance_default({bad, 4, 1, 1, 1}), errc::invalid_argument, "does not fit in float32");
  matrix<expert_id> old(1, 2);
  CHECK_EPLB_ERROR(rebalance_default({load, 4, 1, 1, 1, &old}), errc::invalid_argument,
                   "old_phy2log: shape 1x2 does not match");
  matrix<expert_id> old2(1, 4, 9);
  CHECK_EPLB_ERROR(rebalance_default({load, 4, 1, 1, 1, &old2}), errc::invalid_argument,
                   "old_phy2log[0][0]: expert id 9");
  CHECK_EPLB_ERROR(parse_policy("greedy"), errc::invalid_argument, "unknown policy \"greedy\"");
  CHECK(parse_policy("min_move") == policy_kind::min_move);
}

TEST_CASE("random inputs: properties and agreement with the literal reference") {
  std::mt19937_64 rng(1234);
  for (int iter = 0; iter < 300; ++iter) {
    const int nodes = std::uniform_int_distribution<int>(1, 4)(rng);
    const int gpus_per_node = std::uniform_int_distribution<int>(1, 4)(rng);
    const int gpus = nodes * gpus_per_node;
    const int groups = nodes * std::uniform_int_distribution<int>(1, 3)(rng);
    const int group_size = std::uniform_int_distribution<int>(1, 5)(rng);
    const int experts = groups * group_size;
    const int per_gpu = (experts + gpus - 1) / gpus + std::uniform_int_distribution<int>(0, 3)(rng);
    const int replicas = per_gpu * gpus;
    const int layers = std::uniform_int_distribution<int>(1, 3)(rng);
    const bool ties = iter % 3 == 0;
    matrix<double> load(static_cast<std::size_t>(layers), static_cast<std::size_t>(experts));
    for (auto& v : load.flat()) {
      v = ties ? std::uniform_int_distribution<int>(0, 3)(rng)
               : std::floor(std::exp(std::uniform_real_distribution<double>(0, 9)(rng)));
    }
    CAPTURE(iter);
    const auto out = rebalance_default({load, replicas, groups, nodes, gpus});
    placement p(out, experts, gpus);                                         // every expert has a replica, ids valid
    CHECK(rebalance_default({load, replicas, groups, nodes, gpus}) == out);  // deterministic
    for (int l = 0; l < layers; ++l) {
      std::vector<float> w(experts);
      for (int e = 0; e < experts; ++e) w[e] = static_cast<float>(load(l, e));
      CHECK(reference_policy::run(w, replicas, groups, nodes, gpus) == row_vec(out, l));
      // Hierarchical: each group's replicas all sit on one node.
      const int slots_per_node = replicas / nodes;
      std::map<int, std::set<int>> nodes_of_group;
      for (int s = 0; s < replicas; ++s) nodes_of_group[out(l, s) / group_size].insert(s / slots_per_node);
      for (const auto& [g, ns] : nodes_of_group) CHECK(ns.size() == 1);
    }
    // With an old placement: the same experts per rank, and the old slot when an expert stays.
    auto old = placement::initial(layers, experts, replicas, gpus).phy2log();
    for (int l = 0; l < layers; ++l) std::shuffle(old.row(l).begin(), old.row(l).end(), rng);
    const auto kept = rebalance_default({load, replicas, groups, nodes, gpus, &old});
    for (int l = 0; l < layers; ++l) {
      for (int r = 0; r < gpus; ++r) {
        std::multiset<int> a, b;
        for (int s = r * per_gpu; s < (r + 1) * per_gpu; ++s) {
          a.insert(out(l, s));
          b.insert(kept(l, s));
        }
        CHECK(a == b);
        // Every expert this rank had and still has (as many times) occupies an old slot.
        std::multiset<int> had;
        for (int s = r * per_gpu; s < (r + 1) * per_gpu; ++s) had.insert(old(l, s));
        int stays = 0, in_place = 0;
        for (int e : std::set<int>(a.begin(), a.end())) stays += static_cast<int>(std::min(a.count(e), had.count(e)));
        for (int s = r * per_gpu; s < (r + 1) * per_gpu; ++s) in_place += kept(l, s) == old(l, s);
        CHECK(in_place == stays);
      }
    }
  }
}

TEST_CASE("balancedness improves over the trivial placement on skewed loads") {
  std::mt19937_64 rng(99);
  for (int iter = 0; iter < 50; ++iter) {
    const int experts = 64, ranks = 8, replicas = 80, layers = 4;
    matrix<double> load(layers, experts);
    for (auto& v : load.flat())
      v = std::floor(1000.0 / std::pow(1.0 + std::uniform_int_distribution<int>(0, 63)(rng), 1.2));
    const auto trivial = placement::initial(layers, experts, replicas, ranks);
    placement after(rebalance_default({load, replicas, 8, 2, ranks}), experts, ranks);
    CHECK(balancedness(after, load) >= balancedness(trivial, load));
  }
}

TEST_CASE("min_move: >= 99% of the default's balance, never more moves, zero moves for an unchanged load") {
  std::mt19937_64 rng(2024);
  for (int iter = 0; iter < 120; ++iter) {
    const int nodes = 1 + static_cast<int>(rng() % 3);
    const int gpus = nodes * (1 + static_cast<int>(rng() % 4));
    const int groups = nodes * (1 + static_cast<int>(rng() % 2));
    const int experts = groups * (2 + static_cast<int>(rng() % 4));
    const int per_gpu = (experts + gpus - 1) / gpus + static_cast<int>(rng() % 3);
    const int replicas = per_gpu * gpus;
    const int layers = 3;
    const auto draw = [&] {
      matrix<double> m(layers, static_cast<std::size_t>(experts));
      for (auto& v : m.flat()) v = std::floor(std::exp(std::uniform_real_distribution<double>(0, 8)(rng)));
      return m;
    };
    const auto load0 = draw();
    const auto load1 = draw();
    CAPTURE(iter);
    const auto old = rebalance_default({load0, replicas, groups, nodes, gpus});
    const auto def = rebalance_default({load1, replicas, groups, nodes, gpus, &old});
    const auto mm = rebalance_min_move({load1, replicas, groups, nodes, gpus, &old});
    CHECK(moved_slots(old, mm) <= moved_slots(old, def));
    placement pd(def, experts, gpus), pm(mm, experts, gpus);
    CHECK(balancedness(pm, load1) >= 0.99 * balancedness(pd, load1));
    // Hierarchical: groups stay whole on a node.
    const int gs = experts / groups;
    for (int l = 0; l < layers; ++l) {
      std::map<int, std::set<int>> nodes_of_group;
      for (int s = 0; s < replicas; ++s) nodes_of_group[mm(l, s) / gs].insert(s / (replicas / nodes));
      for (const auto& [g, ns] : nodes_of_group) CHECK(ns.size() == 1);
    }
    // The same load again: nothing moves.
    CHECK(moved_slots(mm, rebalance_min_move({load1, replicas, groups, nodes, gpus, &mm})) == 0);
  }
}

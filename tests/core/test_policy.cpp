#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "check_error.hpp"
#include "eplb/core/load.hpp"
#include "eplb/core/policy.hpp"

using namespace eplb;

// The policies' first, quadratic implementations, kept verbatim as references: the fast versions
// must give the same output (slot preservation always; min_move while its matchings are exact, of
// at most 32 blocks, and its in-place search stays within its work budget, as small shapes do).
namespace old_code {

using namespace eplb;

void preserve_rank_slots(std::span<expert_id> row, std::span<const expert_id> old_row, int num_ranks,
                         std::vector<expert_id>& fresh, std::vector<std::uint64_t>& used, std::vector<char>& kept) {
  const auto per_rank = static_cast<int>(row.size()) / num_ranks;
  const int words = (per_rank + 63) / 64;
  fresh.resize(static_cast<std::size_t>(per_rank));
  used.resize(static_cast<std::size_t>(words));
  kept.resize(static_cast<std::size_t>(per_rank));
  const auto is_used = [&](int j) { return (used[j / 64] >> (j % 64)) & 1U; };
  for (int r = 0; r < num_ranks; ++r) {
    const auto base = static_cast<std::size_t>(r * per_rank);
    std::copy_n(row.begin() + static_cast<std::ptrdiff_t>(base), per_rank, fresh.begin());
    std::fill(used.begin(), used.end(), 0);
    std::fill(kept.begin(), kept.end(), 0);
    for (int slot = 0; slot < per_rank; ++slot) {
      const expert_id want = old_row[base + slot];
      for (int w = 0; w < words; ++w) {
        std::uint64_t match = 0;
        const int end = std::min(64, per_rank - w * 64);
        for (int j = 0; j < end; ++j) match |= static_cast<std::uint64_t>(fresh[w * 64 + j] == want) << j;
        match &= ~used[w];
        if (match != 0) {
          const int j = std::countr_zero(match);
          used[w] |= std::uint64_t{1} << j;
          row[base + slot] = want;
          kept[slot] = 1;
          break;
        }
      }
    }
    int next_fresh = 0;
    for (int slot = 0; slot < per_rank; ++slot) {
      if (kept[slot]) continue;
      while (is_used(next_fresh)) ++next_fresh;
      row[base + slot] = fresh[next_fresh++];
    }
  }
}

// Hungarian algorithm with potentials, O(n^3): the row -> column assignment of maximum total weight.
std::vector<int> max_weight_assignment(const std::vector<std::vector<std::int64_t>>& weight) {
  const int n = static_cast<int>(weight.size());
  const std::int64_t inf = std::numeric_limits<std::int64_t>::max() / 4;
  std::vector<std::int64_t> u(n + 1, 0), v(n + 1, 0);
  std::vector<int> match(n + 1, 0), way(n + 1, 0);  // match[column] = row, 1-based; 0 = free
  for (int i = 1; i <= n; ++i) {
    match[0] = i;
    int j0 = 0;
    std::vector<std::int64_t> minv(n + 1, inf);
    std::vector<char> used(n + 1, 0);
    do {
      used[j0] = 1;
      const int i0 = match[j0];
      std::int64_t delta = inf;
      int j1 = 0;
      for (int j = 1; j <= n; ++j) {
        if (used[j]) continue;
        const std::int64_t cur = -weight[i0 - 1][j - 1] - u[i0] - v[j];  // minimise the negated weight
        if (cur < minv[j]) {
          minv[j] = cur;
          way[j] = j0;
        }
        if (minv[j] < delta) {
          delta = minv[j];
          j1 = j;
        }
      }
      for (int j = 0; j <= n; ++j) {
        if (used[j]) {
          u[match[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (match[j0] != 0);
    do {
      const int j1 = way[j0];
      match[j0] = match[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int> row_to_col(static_cast<std::size_t>(n));
  for (int j = 1; j <= n; ++j) row_to_col[static_cast<std::size_t>(match[j] - 1)] = j - 1;
  return row_to_col;
}

// Size of the multiset intersection of two sorted vectors.
std::int64_t overlap(const std::vector<expert_id>& a, const std::vector<expert_id>& b) {
  std::int64_t n = 0;
  for (std::size_t i = 0, j = 0; i < a.size() && j < b.size();) {
    if (a[i] == b[j]) {
      ++n, ++i, ++j;
    } else if (a[i] < b[j]) {
      ++i;
    } else {
      ++j;
    }
  }
  return n;
}

std::vector<expert_id> sorted_range(std::span<const expert_id> row, int first, int count) {
  std::vector<expert_id> v(row.begin() + first, row.begin() + first + count);
  std::sort(v.begin(), v.end());
  return v;
}

// Weights of placing block a of `from` where block b of `to` is (blocks of `size` slots).
std::vector<std::vector<std::int64_t>> overlaps(std::span<const expert_id> from, int from_first,
                                                std::span<const expert_id> to, int to_first, int blocks, int size) {
  std::vector<std::vector<std::int64_t>> w(static_cast<std::size_t>(blocks),
                                           std::vector<std::int64_t>(static_cast<std::size_t>(blocks)));
  std::vector<std::vector<expert_id>> theirs;
  for (int b = 0; b < blocks; ++b) theirs.push_back(sorted_range(to, to_first + b * size, size));
  for (int a = 0; a < blocks; ++a) {
    const auto mine = sorted_range(from, from_first + a * size, size);
    for (int b = 0; b < blocks; ++b)
      w[static_cast<std::size_t>(a)][static_cast<std::size_t>(b)] = overlap(mine, theirs[static_cast<std::size_t>(b)]);
  }
  return w;
}

// Per-layer incremental improvement of the old placement: swap slots between ranks of a node, or
// turn a spare replica of a cold expert into a replica of the hottest expert of the heaviest rank,
// whichever lowers the heaviest rank most, until the heaviest rank is within `target`. Each step
// changes one or two slots. Returns false when it cannot reach the target.
bool improve_in_place(std::span<expert_id> row, std::span<const double> load, int num_ranks, int nodes, double target,
                      int max_steps) {
  const int slots = static_cast<int>(row.size());
  const int per_rank = slots / num_ranks;
  const int per_node = slots / nodes;
  std::vector<int> count(load.size(), 0);
  for (expert_id e : row) {
    if (e >= 0) ++count[static_cast<std::size_t>(e)];
  }
  const auto w = [&](expert_id e) {
    return e < 0 ? 0.0 : load[static_cast<std::size_t>(e)] / count[static_cast<std::size_t>(e)];
  };
  std::vector<double> rank_load(static_cast<std::size_t>(num_ranks));
  const auto recompute = [&] {
    std::fill(rank_load.begin(), rank_load.end(), 0.0);
    for (int p = 0; p < slots; ++p) rank_load[static_cast<std::size_t>(p / per_rank)] += w(row[p]);
  };
  recompute();
  for (int step = 0; step < max_steps; ++step) {
    const int h = static_cast<int>(std::max_element(rank_load.begin(), rank_load.end()) - rank_load.begin());
    if (rank_load[static_cast<std::size_t>(h)] <= target) return true;
    const int node_first = (h * per_rank) / per_node * per_node;
    double best = rank_load[static_cast<std::size_t>(h)];
    int swap_i = -1, swap_j = -1;
    // Swaps between the heaviest rank and another rank of its node.
    for (int i = h * per_rank; i < (h + 1) * per_rank; ++i) {
      for (int j = node_first; j < node_first + per_node; ++j) {
        const int k = j / per_rank;
        if (k == h || row[i] == row[j]) continue;
        const double d = w(row[i]) - w(row[j]);
        if (d <= 0) continue;
        const double worst =
            std::max(rank_load[static_cast<std::size_t>(h)] - d, rank_load[static_cast<std::size_t>(k)] + d);
        if (worst < best) best = worst, swap_i = i, swap_j = j;
      }
    }
    // Replica moves: the hottest expert of the heaviest rank gains a replica in a slot of its node
    // whose expert has a spare replica; every rank's load changes, so evaluate the new maximum.
    expert_id hot = -1;
    for (int i = h * per_rank; i < (h + 1) * per_rank; ++i) {
      if (row[i] >= 0 && (hot < 0 || w(row[i]) > w(hot))) hot = row[i];
    }
    int move_j = -1;
    double move_best = best;
    if (hot >= 0) {
      for (int j = node_first; j < node_first + per_node; ++j) {
        const expert_id c = row[j];
        if (c == hot || (c >= 0 && count[static_cast<std::size_t>(c)] < 2)) continue;
        row[j] = hot;
        if (c >= 0) --count[static_cast<std::size_t>(c)];
        ++count[static_cast<std::size_t>(hot)];
        recompute();
        const double worst = *std::max_element(rank_load.begin(), rank_load.end());
        --count[static_cast<std::size_t>(hot)];
        if (c >= 0) ++count[static_cast<std::size_t>(c)];
        row[j] = c;
        if (worst < move_best) move_best = worst, move_j = j;
      }
      recompute();
    }
    if (move_j >= 0 && move_best < best) {
      const expert_id c = row[move_j];
      if (c >= 0) --count[static_cast<std::size_t>(c)];
      ++count[static_cast<std::size_t>(hot)];
      row[move_j] = hot;
    } else if (swap_i >= 0) {
      std::swap(row[swap_i], row[swap_j]);
    } else {
      return false;  // stuck above the target
    }
    recompute();
  }
  return *std::max_element(rank_load.begin(), rank_load.end()) <= target;
}

matrix<expert_id> rebalance_min_move(const rebalance_input& in) {
  if (in.old_phy2log == nullptr) return rebalance_default(in);
  auto fresh_in = in;
  fresh_in.old_phy2log = nullptr;
  const auto packs = rebalance_default(fresh_in);  // validates the input
  const auto fallback = rebalance_default(in);
  const int nodes = in.num_groups % in.num_nodes == 0 ? in.num_nodes : 1;
  const int per_node = in.num_ranks / nodes;
  const int per_rank = in.num_replicas / in.num_ranks;
  matrix<expert_id> out(packs.rows(), packs.cols());
  std::vector<expert_id> fresh;
  std::vector<std::uint64_t> used;
  std::vector<char> kept;
  for (std::size_t l = 0; l < packs.rows(); ++l) {
    const auto pack_row = packs.row(l);
    const auto old_row = in.old_phy2log->row(l);
    auto row = out.row(l);
    // Whole nodes first (so every node still holds whole groups), then the ranks of each node.
    const auto node_to = max_weight_assignment(overlaps(pack_row, 0, old_row, 0, nodes, per_node * per_rank));
    for (int a = 0; a < nodes; ++a) {
      const int b = node_to[static_cast<std::size_t>(a)];
      const auto rank_to = max_weight_assignment(
          overlaps(pack_row, a * per_node * per_rank, old_row, b * per_node * per_rank, per_node, per_rank));
      for (int i = 0; i < per_node; ++i) {
        const int dst = (b * per_node + rank_to[static_cast<std::size_t>(i)]) * per_rank;
        std::copy_n(pack_row.begin() + (a * per_node + i) * per_rank, per_rank, row.begin() + dst);
      }
    }
    preserve_rank_slots(row, old_row, in.num_ranks, fresh, used, kept);
    // An incremental fix of the old placement often moves far fewer slots; take it when it keeps
    // the heaviest rank within 1% of the default's (so balancedness stays >= 99% of the default's).
    {
      std::vector<double> w(in.load.cols());
      for (std::size_t e = 0; e < w.size(); ++e) w[e] = static_cast<double>(static_cast<float>(in.load(l, e)));
      const auto heaviest = [&](std::span<const expert_id> r) {
        std::vector<int> cnt(w.size(), 0);
        for (expert_id e : r) {
          if (e >= 0) ++cnt[static_cast<std::size_t>(e)];
        }
        std::vector<double> per(static_cast<std::size_t>(in.num_ranks), 0.0);
        for (std::size_t p = 0; p < r.size(); ++p) {
          if (r[p] >= 0)
            per[p / static_cast<std::size_t>(per_rank)] +=
                w[static_cast<std::size_t>(r[p])] / cnt[static_cast<std::size_t>(r[p])];
        }
        return *std::max_element(per.begin(), per.end());
      };
      const double target = heaviest(row) / 0.995;
      std::vector<expert_id> candidate(old_row.begin(), old_row.end());
      const bool complete = std::all_of(candidate.begin(), candidate.end(), [](expert_id e) { return e >= 0; });
      // Hierarchical mode keeps every group on one node; an old placement without that property
      // (vLLM's round-robin start, say) is not a base to improve on.
      const int group_size = static_cast<int>(w.size()) / (nodes > 1 ? in.num_groups : 1);
      const auto groups_whole = [&](std::span<const expert_id> r) {
        std::vector<int> node_of(static_cast<std::size_t>(nodes > 1 ? in.num_groups : 1), -1);
        for (std::size_t p = 0; p < r.size(); ++p) {
          if (r[p] < 0) continue;
          auto& n = node_of[static_cast<std::size_t>(r[p] / group_size)];
          const int here = static_cast<int>(p) / (per_node * per_rank);
          if (n >= 0 && n != here) return false;
          n = here;
        }
        return true;
      };
      if (complete && (nodes == 1 || groups_whole(candidate)) &&
          improve_in_place(candidate, w, in.num_ranks, nodes, target, 4 * static_cast<int>(candidate.size()))) {
        std::int64_t inc_moves = 0, match_moves = 0;
        for (std::size_t p = 0; p < candidate.size(); ++p) {
          inc_moves += candidate[p] != old_row[p];
          match_moves += row[p] != old_row[p];
        }
        if (inc_moves < match_moves) std::copy(candidate.begin(), candidate.end(), row.begin());
      }
    }
    // Node-first matching is not globally optimal: never move more than the default would.
    std::int64_t mine = 0, theirs = 0;
    for (std::size_t p = 0; p < row.size(); ++p) {
      mine += row[p] != old_row[p];
      theirs += fallback(l, p) != old_row[p];
    }
    if (theirs < mine) std::copy(fallback.row(l).begin(), fallback.row(l).end(), row.begin());
  }
  return out;
}

}  // namespace old_code

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

namespace {

// Every expert once, the other slots random experts (or, with `empties`, sometimes empty), shuffled.
matrix<expert_id> random_map(int layers, int experts, int slots, bool empties, std::mt19937_64& rng) {
  matrix<expert_id> m(static_cast<std::size_t>(layers), static_cast<std::size_t>(slots));
  for (int l = 0; l < layers; ++l) {
    for (int p = 0; p < slots; ++p) {
      const bool empty = empties && rng() % 4 == 0;
      m(l, p) = p < experts ? p : empty ? empty_slot : static_cast<expert_id>(rng() % experts);
    }
    std::shuffle(m.row(l).begin(), m.row(l).end(), rng);
  }
  return m;
}

// Integer loads (so float32 group sums are exact in the reference), with many ties when `ties`.
matrix<double> random_load(int layers, int experts, bool ties, std::mt19937_64& rng) {
  matrix<double> m(static_cast<std::size_t>(layers), static_cast<std::size_t>(experts));
  for (auto& v : m.flat()) {
    v = ties ? std::uniform_int_distribution<int>(0, 3)(rng)
             : std::floor(std::exp(std::uniform_real_distribution<double>(0, 9)(rng)));
  }
  return m;
}

struct shape {
  int experts, replicas, groups, nodes, ranks;
};

// Up to max_nodes x max_per_node ranks; hierarchical or (groups not a multiple of nodes) global.
shape random_shape(std::mt19937_64& rng, int max_nodes, int max_per_node, int max_extra) {
  const auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int nodes = pick(1, max_nodes);
  const int ranks = nodes * pick(1, max_per_node);
  const int groups = rng() % 4 == 0 && nodes > 1 ? nodes * pick(1, 3) + 1 : nodes * pick(1, 3);
  const int experts = groups * pick(1, 6);
  const int per_rank = (experts + ranks - 1) / ranks + pick(0, max_extra);
  return {experts, per_rank * ranks, groups, nodes, ranks};
}

// Wall time of f() in seconds.
template <typename F>
double seconds_of(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The bound on the shapes that once took seconds to minutes: 2 s, 10 s under the sanitizers.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__OPTIMIZE__)
constexpr double time_bound_s = 10.0;
#else
constexpr double time_bound_s = 2.0;
#endif

}  // namespace

TEST_CASE("heap packing and sorted slot preservation match the quadratic reference on random shapes") {
  std::mt19937_64 rng(4242);
  for (int iter = 0; iter < 400; ++iter) {
    // Many packs (up to 160 ranks), or one to three ranks with up to ~300 slots each.
    const bool wide = iter % 4 == 0;
    const auto s = wide ? random_shape(rng, 1, 3, 100) : random_shape(rng, 4, 40, 6);
    const int layers = 2;
    const auto load = random_load(layers, s.experts, iter % 3 == 0, rng);
    const auto old =
        iter % 5 == 0
            ? rebalance_default({random_load(layers, s.experts, false, rng), s.replicas, s.groups, s.nodes, s.ranks})
            : random_map(layers, s.experts, s.replicas, iter % 2 == 0, rng);
    CAPTURE(iter);
    const auto out = rebalance_default({load, s.replicas, s.groups, s.nodes, s.ranks, &old});
    const bool hierarchical = s.groups % s.nodes == 0;
    for (int l = 0; l < layers; ++l) {
      std::vector<float> w(static_cast<std::size_t>(s.experts));
      for (int e = 0; e < s.experts; ++e) w[static_cast<std::size_t>(e)] = static_cast<float>(load(l, e));
      auto expected =
          reference_policy::run(w, s.replicas, hierarchical ? s.groups : 1, hierarchical ? s.nodes : 1, s.ranks);
      std::vector<expert_id> fresh;
      std::vector<std::uint64_t> used;
      std::vector<char> kept;
      old_code::preserve_rank_slots(expected, old.row(l), s.ranks, fresh, used, kept);
      CHECK(expected == row_vec(out, l));
    }
  }
}

TEST_CASE("min_move matches its quadratic reference while its matchings are exact (<= 32 blocks)") {
  std::mt19937_64 rng(777);
  for (int iter = 0; iter < 200; ++iter) {
    const auto s = random_shape(rng, 4, 8, 4);
    const int layers = 2;
    const auto load = random_load(layers, s.experts, iter % 4 == 0, rng);
    // The policy's own earlier placement (the usual case), or an arbitrary one, complete or not.
    const auto old =
        iter % 3 == 0
            ? random_map(layers, s.experts, s.replicas, iter % 2 == 0, rng)
            : rebalance_min_move({random_load(layers, s.experts, false, rng), s.replicas, s.groups, s.nodes, s.ranks});
    CAPTURE(iter);
    const rebalance_input in{load, s.replicas, s.groups, s.nodes, s.ranks, &old};
    CHECK(rebalance_min_move(in) == old_code::rebalance_min_move(in));
  }
  // DeepSeek-V3's global shape (256 experts on 288 slots, 32 ranks), where the search takes many steps.
  for (int iter = 0; iter < 3; ++iter) {
    const auto previous = random_load(4, 256, false, rng);
    const auto load = random_load(4, 256, false, rng);
    const auto old = rebalance_default({previous, 288, 1, 1, 32});
    const rebalance_input in{load, 288, 1, 1, 32, &old};
    CHECK(rebalance_min_move(in) == old_code::rebalance_min_move(in));
  }
}

TEST_CASE("min_move over more than 32 ranks (greedy matchings) keeps its guarantees") {
  std::mt19937_64 rng(31337);
  // The ranks of a node (all ranks in global mode) are matched as one problem: make it > 32.
  const auto ranks_matched = [](const shape& s) { return s.groups % s.nodes == 0 ? s.ranks / s.nodes : s.ranks; };
  for (int iter = 0; iter < 12; ++iter) {
    auto s = random_shape(rng, 1, 1, 0);
    while (ranks_matched(s) <= 32) s = iter % 2 == 0 ? random_shape(rng, 1, 80, 3) : random_shape(rng, 3, 48, 3);
    const int layers = 2;
    const auto load0 = random_load(layers, s.experts, false, rng);
    const auto load1 = random_load(layers, s.experts, iter % 5 == 0, rng);
    CAPTURE(iter);
    const auto old = rebalance_min_move({load0, s.replicas, s.groups, s.nodes, s.ranks});
    const auto def = rebalance_default({load1, s.replicas, s.groups, s.nodes, s.ranks, &old});
    const auto mm = rebalance_min_move({load1, s.replicas, s.groups, s.nodes, s.ranks, &old});
    CHECK(moved_slots(old, mm) <= moved_slots(old, def));
    placement pd(def, s.experts, s.ranks), pm(mm, s.experts, s.ranks);
    CHECK(balancedness(pm, load1) >= 0.99 * balancedness(pd, load1));
    if (s.groups % s.nodes == 0) {  // hierarchical: groups stay whole on a node
      const int gs = s.experts / s.groups;
      for (int l = 0; l < layers; ++l) {
        std::map<int, std::set<int>> nodes_of_group;
        for (int p = 0; p < s.replicas; ++p) nodes_of_group[mm(l, p) / gs].insert(p / (s.replicas / s.nodes));
        for (const auto& [g, ns] : nodes_of_group) CHECK(ns.size() == 1);
      }
    }
    CHECK(moved_slots(mm, rebalance_min_move({load1, s.replicas, s.groups, s.nodes, s.ranks, &mm})) == 0);
  }
}

TEST_CASE("shapes beyond the documented limits are refused, naming the limit") {
  const matrix<double> one(1, 1000, 1.0);
  CHECK_EPLB_ERROR(rebalance_default({one, 1'000'000, 1, 1, 500'000}), errc::invalid_argument,
                   "num_ranks: 500000 is over the limit of 4096 ranks (eplb::max_ranks)");
  CHECK_EPLB_ERROR(rebalance_default({one, 200'000, 1, 1, 1}), errc::invalid_argument,
                   "num_replicas: 200000 is over the limit of 65536 slots per layer (eplb::max_slots_per_layer)");
  const matrix<double> tall(max_layers + 1, 8, 1.0);
  CHECK_EPLB_ERROR(rebalance_default({tall, 8, 1, 1, 1}), errc::invalid_argument,
                   "load: 1025 layers are over the limit of 1024 (eplb::max_layers)");
  const matrix<double> many(max_layers, 8, 1.0);
  CHECK_EPLB_ERROR(rebalance_default({many, 8192, 1, 1, 8}), errc::invalid_argument,
                   "8388608 slots, over the limit of 4194304 (eplb::max_total_slots)");
  // One expert could get 32,769 replicas: log2phy would be padded to 32,768 x 32,769 entries.
  const matrix<double> wide(1, 32768, 1.0);
  CHECK_EPLB_ERROR(rebalance_default({wide, 65536, 1, 1, 8}), errc::invalid_argument,
                   "1073774592 entries, over the limit of 16777216 (eplb::max_log2phy_entries)");
  const auto old = placement::initial(1, 1000, 200'000, 1).phy2log();
  CHECK_EPLB_ERROR(rebalance_min_move({one, 200'000, 1, 1, 1, &old}), errc::invalid_argument,
                   "eplb::max_slots_per_layer");
  CHECK_EPLB_ERROR(check_limits({one, 8, 1, 1, max_ranks + 1}), errc::invalid_argument, "eplb::max_ranks");
  const matrix<double> full(1, max_slots_per_layer, 1.0);
  check_limits({full, max_slots_per_layer, 1, 1, max_ranks});  // at the limits: accepted
}

TEST_CASE("shapes that once took seconds to minutes finish in bounded time") {
  std::mt19937_64 rng(5);
  // Slot preservation on one rank was O(slots^2): 200,000 slots took 16.6 s (now refused), 65,536 ~2 s.
  const auto load = random_load(1, 256, false, rng);
  const auto scrambled = random_map(1, 256, 65536, false, rng);
  CHECK(seconds_of([&] { (void)rebalance_default({load, 65536, 1, 1, 1, &scrambled}); }) < time_bound_s);
  // Packing was O(items x packs): 65,536 slots over 4,096 ranks.
  CHECK(seconds_of([&] { (void)rebalance_default({load, 65536, 1, 1, 4096, &scrambled}); }) < time_bound_s);
  // min_move, 2,048 experts on 4,096 slots of one node: 2.6 s (8 ranks) to 102 s (4,096 ranks),
  // from its own earlier placement or from an arbitrary one.
  const auto load2 = random_load(1, 2048, false, rng);
  for (const int ranks : {8, 512, 4096}) {
    CAPTURE(ranks);
    const auto old = ranks == 512 ? random_map(1, 2048, 4096, false, rng)
                                  : rebalance_default({random_load(1, 2048, false, rng), 4096, 1, 1, ranks});
    CHECK(seconds_of([&] { (void)rebalance_min_move({load2, 4096, 1, 1, ranks, &old}); }) < time_bound_s);
  }
}

TEST_CASE("keep_masked_out: an expert no slot holds gets no slot in the plan; the rest stay") {
  // 2 layers; the holders (6 slots: leaving ranks' included) lack expert 3 in layer 0 only.
  matrix<expert_id> holders(2, 6, 0);
  const expert_id held[2][6] = {{0, 1, 2, 0, 1, 2}, {0, 1, 2, 3, -1, -1}};
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t s = 0; s < 6; ++s) holders(l, s) = held[l][s];
  }
  matrix<expert_id> next(2, 4, 0);  // the plan over fewer slots (the survivors')
  const expert_id planned[2][4] = {{3, 1, 2, 0}, {3, 1, 2, 0}};
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t s = 0; s < 4; ++s) next(l, s) = planned[l][s];
  }
  keep_masked_out(next, holders, 4);
  CHECK(next(0, 0) == empty_slot);  // expert 3 is held nowhere in layer 0
  CHECK(next(1, 0) == 3);           // but is in layer 1
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t s = 1; s < 4; ++s) CHECK(next(l, s) == planned[l][s]);
  }
  matrix<expert_id> one_layer(1, 4, 0);
  CHECK_THROWS_AS(keep_masked_out(one_layer, holders, 4), error);
}

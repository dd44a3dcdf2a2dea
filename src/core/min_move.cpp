// The move-minimising policy: the default policy's packs (hence its balance), placed on the ranks
// that already hold most of each pack.
#include <algorithm>
#include <limits>
#include <span>

#include "core/policy_detail.hpp"
#include "eplb/core/policy.hpp"

namespace eplb {
namespace {

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

}  // namespace

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
    detail::preserve_rank_slots(row, old_row, in.num_ranks, fresh, used, kept);
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

}  // namespace eplb

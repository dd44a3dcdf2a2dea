// The move-minimising policy: the default policy's packs (hence its balance), placed on the ranks
// that already hold most of each pack.
#include <algorithm>
#include <limits>

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

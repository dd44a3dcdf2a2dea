// Block matching for the move-minimising policy: an exact maximum-weight assignment for few blocks,
// a greedy one over maximum-cardinality matchings (Hopcroft-Karp) for many.
#include "core/block_matching.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

namespace eplb::detail {
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

// Matchings of up to this many blocks are exact (the Hungarian algorithm: at most 32^3 steps);
// larger ones, where O(n^3) took 85 s for 4,096 ranks, are near-maximum (greedy_assignment).
constexpr int exact_matching_limit = 32;

// (expert, block, multiplicity) for each distinct expert of each block, sorted.
using expert_entry = std::array<int, 3>;
std::vector<expert_entry> expert_entries(std::span<const expert_id> row, int first, int blocks, int size) {
  std::vector<expert_entry> out;
  for (int a = 0; a < blocks; ++a) {
    const auto block = sorted_range(row, first + a * size, size);
    for (std::size_t i = 0, k = 0; i < block.size(); i = k) {
      while (k < block.size() && block[k] == block[i]) ++k;
      if (block[i] >= 0) out.push_back({block[i], a, static_cast<int>(k - i)});
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

struct block_pair {
  std::int64_t weight;
  int a, b;
};

// Pairs (block a of `from`, block b of `to`) that share an expert, with their overlap. An expert on
// few blocks pairs all its blocks on both sides; one on many (a hot expert replicated everywhere)
// pairs them in order, so there are O(entries) pairs rather than O(blocks^2). Such an expert's
// share of an overlap is then only counted for the pairs formed: a heuristic, like the greedy.
std::vector<block_pair> candidate_pairs(const std::vector<expert_entry>& from, const std::vector<expert_entry>& to) {
  std::vector<block_pair> pairs;
  for (std::size_t i = 0, j = 0; i < from.size() && j < to.size();) {
    if (from[i][0] != to[j][0]) {
      from[i][0] < to[j][0] ? ++i : ++j;
      continue;
    }
    std::size_t i2 = i, j2 = j;
    while (i2 < from.size() && from[i2][0] == from[i][0]) ++i2;
    while (j2 < to.size() && to[j2][0] == to[j][0]) ++j2;
    const std::size_t na = i2 - i, nb = j2 - j;
    const auto add = [&](const expert_entry& x, const expert_entry& y) {
      pairs.push_back({std::min(x[2], y[2]), x[1], y[1]});
    };
    if (na * nb <= 8 * (na + nb)) {
      for (std::size_t x = i; x < i2; ++x) {
        for (std::size_t y = j; y < j2; ++y) add(from[x], to[y]);
      }
    } else {
      for (std::size_t k = 0; k < std::min(na, nb); ++k) add(from[i + k], to[j + k]);
    }
    i = i2;
    j = j2;
  }
  // One entry per pair, its weights summed over the shared experts.
  std::sort(pairs.begin(), pairs.end(),
            [](const block_pair& x, const block_pair& y) { return std::tie(x.a, x.b) < std::tie(y.a, y.b); });
  std::size_t n = 0;
  for (std::size_t k = 0; k < pairs.size(); ++k) {
    if (n > 0 && pairs[n - 1].a == pairs[k].a && pairs[n - 1].b == pairs[k].b) {
      pairs[n - 1].weight += pairs[k].weight;
    } else {
      pairs[n++] = pairs[k];
    }
  }
  pairs.resize(n);
  return pairs;
}

// Hopcroft-Karp: a maximum-cardinality matching over the edges a -> adj[first[a] .. first[a + 1]),
// extending a_to / b_to (-1: free). O(E sqrt(V)).
class cardinality_matching {
 public:
  cardinality_matching(const std::vector<int>& first, const std::vector<int>& adj, std::vector<int>& a_to,
                       std::vector<int>& b_to)
      : first_(first), adj_(adj), a_to_(a_to), b_to_(b_to), dist_(a_to.size()), next_(a_to.size()) {}

  void run() {
    while (layer()) {
      for (std::size_t a = 0; a < a_to_.size(); ++a) next_[a] = first_[a];
      for (std::size_t a = 0; a < a_to_.size(); ++a) {
        if (a_to_[a] < 0) augment(static_cast<int>(a));
      }
    }
  }

 private:
  static constexpr int unreached = std::numeric_limits<int>::max();

  // Breadth-first layers from the free blocks of `from`; true when a free block of `to` is reachable.
  bool layer() {
    std::vector<int> queue;
    for (std::size_t a = 0; a < a_to_.size(); ++a) {
      dist_[a] = a_to_[a] < 0 && first_[a] < first_[a + 1] ? 0 : unreached;
      if (dist_[a] == 0) queue.push_back(static_cast<int>(a));
    }
    bool found = false;
    for (std::size_t q = 0; q < queue.size(); ++q) {
      const int a = queue[q];
      for (int k = first_[a]; k < first_[a + 1]; ++k) {
        const int next = b_to_[static_cast<std::size_t>(adj_[k])];
        if (next < 0) {
          found = true;
        } else if (dist_[next] == unreached) {
          dist_[next] = dist_[a] + 1;
          queue.push_back(next);
        }
      }
    }
    return found;
  }

  // Depth-first along the layers: an augmenting path from a, applied if found.
  bool augment(int a) {
    for (; next_[a] < first_[a + 1]; ++next_[a]) {
      const int b = adj_[next_[a]];
      const int next = b_to_[static_cast<std::size_t>(b)];
      if (next < 0 || (dist_[next] == dist_[a] + 1 && augment(next))) {
        a_to_[a] = b;
        b_to_[b] = a;
        ++next_[a];
        return true;
      }
    }
    dist_[a] = unreached;
    return false;
  }

  const std::vector<int>& first_;
  const std::vector<int>& adj_;
  std::vector<int>&a_to_, &b_to_;
  std::vector<int> dist_, next_;
};

// Heaviest overlaps first: per overlap value, from the highest down, a maximum-cardinality matching
// of the blocks still free over the pairs of that value; blocks left over are paired in index order.
// Near the maximum total overlap in practice (at least half of it), O(n sqrt(n)) at worst.
std::vector<int> greedy_assignment(std::span<const expert_id> from, int from_first, std::span<const expert_id> to,
                                   int to_first, int blocks, int size) {
  auto pairs =
      candidate_pairs(expert_entries(from, from_first, blocks, size), expert_entries(to, to_first, blocks, size));
  std::sort(pairs.begin(), pairs.end(), [](const block_pair& x, const block_pair& y) {
    return std::tie(y.weight, x.a, x.b) < std::tie(x.weight, y.a, y.b);
  });
  const auto n = static_cast<std::size_t>(blocks);
  std::vector<int> a_to(n, -1), b_to(n, -1), first(n + 1), adj;
  for (std::size_t begin = 0, end = 0; begin < pairs.size(); begin = end) {
    std::fill(first.begin(), first.end(), 0);
    adj.clear();
    for (end = begin; end < pairs.size() && pairs[end].weight == pairs[begin].weight; ++end) {
      const auto& p = pairs[end];
      if (a_to[static_cast<std::size_t>(p.a)] >= 0 || b_to[static_cast<std::size_t>(p.b)] >= 0) continue;
      ++first[static_cast<std::size_t>(p.a) + 1];
      adj.push_back(p.b);  // in order of a: the pairs of one value are sorted by block
    }
    for (std::size_t a = 0; a < n; ++a) first[a + 1] += first[a];
    cardinality_matching(first, adj, a_to, b_to).run();
  }
  std::size_t next_b = 0;
  for (auto& b : a_to) {
    if (b >= 0) continue;
    while (b_to[next_b] >= 0) ++next_b;
    b = static_cast<int>(next_b);
    b_to[next_b] = 0;  // taken
  }
  return a_to;
}

}  // namespace

std::vector<int> match_blocks(std::span<const expert_id> from, int from_first, std::span<const expert_id> to,
                              int to_first, int blocks, int size) {
  if (blocks <= exact_matching_limit) {
    return max_weight_assignment(overlaps(from, from_first, to, to_first, blocks, size));
  }
  return greedy_assignment(from, from_first, to, to_first, blocks, size);
}

}  // namespace eplb::detail

// The move-minimising policy: the default policy's packs (hence its balance), placed on the ranks
// that already hold most of each pack.
#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <tuple>
#include <vector>

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

// The assignment of `from`'s blocks to `to`'s blocks that keeps the most experts where they are.
std::vector<int> match_blocks(std::span<const expert_id> from, int from_first, std::span<const expert_id> to,
                              int to_first, int blocks, int size) {
  if (blocks <= exact_matching_limit) {
    return max_weight_assignment(overlaps(from, from_first, to, to_first, blocks, size));
  }
  return greedy_assignment(from, from_first, to, to_first, blocks, size);
}

// improve_in_place's search, made incremental: rank loads always equal, bit for bit, what summing
// each rank's slots in slot order gives (the first version re-summed every rank after every change
// and for every candidate, O(slots^2) a step), but a change re-sums only the ranks holding an expert
// whose replica count changed, or the changed slot. A work budget bounds the search on huge layers:
// past it the search gives up, as when it is stuck, and min_move keeps its other candidate.
class in_place_search {
 public:
  in_place_search(std::span<expert_id> row, std::span<const double> load, int num_ranks, int nodes,
                  std::int64_t budget);
  /// Steps until the heaviest rank is <= target; false when stuck or out of steps or budget.
  bool run(double target, int max_steps);

 private:
  struct choice {
    double worst;
    int i, j;
  };
  // An expert's load per replica (0 for an empty slot), cached: it is read far more than it changes.
  [[nodiscard]] double w(expert_id e) const { return weight_[static_cast<std::size_t>(e + 1)]; }
  void add_replicas(expert_id e, int n) {
    if (e < 0) return;
    const int c = count_[static_cast<std::size_t>(e)] += n;
    weight_[static_cast<std::size_t>(e + 1)] = load_[static_cast<std::size_t>(e)] / c;
  }
  [[nodiscard]] double rank_sum(int k) const;
  bool spend(std::int64_t units) { return (used_ += units) <= budget_; }
  [[nodiscard]] int node_first(int h) const { return h * per_rank_ / per_node_ * per_node_; }
  void mark_ranks_of(expert_id e);
  void mark_rank(int k);
  void unmark();
  [[nodiscard]] double heaviest_unmarked(const std::vector<std::pair<double, int>>& list) const;
  [[nodiscard]] expert_id hottest(int h) const;
  choice best_swap(int h);
  choice best_replica_move(int h, expert_id hot, double best);
  double move_worst(int j, expert_id hot);
  void apply_move(int j, expert_id hot);
  void apply_swap(int i, int j);
  void resum_marked();

  std::span<expert_id> row_;
  std::span<const double> load_;
  int slots_, per_rank_, per_node_;
  std::int64_t budget_, used_ = 0;
  std::vector<int> count_;
  std::vector<double> weight_;              // by expert + 1
  std::vector<std::vector<int>> slots_of_;  // per expert, the slots holding it (any order)
  std::vector<double> rank_load_;
  std::vector<char> is_marked_;  // ranks whose loads a change touches
  std::vector<int> marked_;
  // One step's candidate moves: the ranks holding hot (their loads with its extra replica) and the
  // others, each with its heaviest_kept heaviest first.
  static constexpr int heaviest_kept = 16;
  std::vector<std::pair<double, int>> hot_ranks_, other_ranks_;
};

in_place_search::in_place_search(std::span<expert_id> row, std::span<const double> load, int num_ranks, int nodes,
                                 std::int64_t budget)
    : row_(row),
      load_(load),
      slots_(static_cast<int>(row.size())),
      per_rank_(slots_ / num_ranks),
      per_node_(slots_ / nodes),
      budget_(budget),
      count_(load.size(), 0),
      weight_(load.size() + 1, 0.0),
      slots_of_(load.size()),
      rank_load_(static_cast<std::size_t>(num_ranks)),
      is_marked_(static_cast<std::size_t>(num_ranks), 0) {
  for (int p = 0; p < slots_; ++p) {
    if (row_[p] < 0) continue;
    add_replicas(row_[p], 1);
    slots_of_[static_cast<std::size_t>(row_[p])].push_back(p);
  }
  for (int k = 0; k < num_ranks; ++k) rank_load_[static_cast<std::size_t>(k)] = rank_sum(k);
}

double in_place_search::rank_sum(int k) const {
  double sum = 0.0;
  for (int p = k * per_rank_; p < (k + 1) * per_rank_; ++p) sum += w(row_[p]);
  return sum;
}

void in_place_search::mark_ranks_of(expert_id e) {
  if (e < 0) return;
  for (const int p : slots_of_[static_cast<std::size_t>(e)]) mark_rank(p / per_rank_);
}

// The heaviest rank of `list` left unmarked: the first unmarked of its sorted front, or when that
// is all marked, the heaviest of the rest.
double in_place_search::heaviest_unmarked(const std::vector<std::pair<double, int>>& list) const {
  const auto sorted = std::min(list.size(), static_cast<std::size_t>(heaviest_kept));
  for (std::size_t i = 0; i < sorted; ++i) {
    if (!is_marked_[static_cast<std::size_t>(list[i].second)]) return list[i].first;
  }
  double heaviest = 0.0;
  for (std::size_t i = sorted; i < list.size(); ++i) {
    if (!is_marked_[static_cast<std::size_t>(list[i].second)]) heaviest = std::max(heaviest, list[i].first);
  }
  return heaviest;
}

void in_place_search::unmark() {
  for (const int k : marked_) is_marked_[static_cast<std::size_t>(k)] = 0;
  marked_.clear();
}

void in_place_search::mark_rank(int k) {
  if (!is_marked_[static_cast<std::size_t>(k)]) is_marked_[static_cast<std::size_t>(k)] = 1, marked_.push_back(k);
}

// Swaps between the heaviest rank and another rank of its node: the one that leaves the pair's
// heavier side lightest (the first in slot order on ties).
in_place_search::choice in_place_search::best_swap(int h) {
  choice best{rank_load_[static_cast<std::size_t>(h)], -1, -1};
  if (!spend(std::int64_t{per_rank_} * per_node_)) return best;
  const int first = node_first(h);
  for (int i = h * per_rank_; i < (h + 1) * per_rank_; ++i) {
    for (int j = first; j < first + per_node_; ++j) {
      const int k = j / per_rank_;
      if (k == h || row_[i] == row_[j]) continue;
      const double d = w(row_[i]) - w(row_[j]);
      if (d <= 0) continue;
      const double worst =
          std::max(rank_load_[static_cast<std::size_t>(h)] - d, rank_load_[static_cast<std::size_t>(k)] + d);
      if (worst < best.worst) best = {worst, i, j};
    }
  }
  return best;
}

// Replica moves: `hot` gains a replica in a slot of the node whose expert has one to spare; the one
// that leaves the heaviest rank lightest, if lighter than `best` (the first in slot order on ties).
in_place_search::choice in_place_search::best_replica_move(int h, expert_id hot, double best) {
  // The loads of hot's ranks once it has one more replica, and of the other ranks as they are, each
  // heaviest first: a candidate's maximum over the ranks it leaves alone is the first one unmarked.
  add_replicas(hot, 1);
  mark_ranks_of(hot);
  hot_ranks_.clear();
  other_ranks_.clear();
  for (const int k : marked_) hot_ranks_.emplace_back(rank_sum(k), k);
  add_replicas(hot, -1);
  for (int k = 0; k < static_cast<int>(rank_load_.size()); ++k) {
    if (!is_marked_[static_cast<std::size_t>(k)]) other_ranks_.emplace_back(rank_load_[static_cast<std::size_t>(k)], k);
  }
  spend(static_cast<std::int64_t>(marked_.size()) * per_rank_ + 4 * static_cast<std::int64_t>(rank_load_.size()));
  unmark();
  for (auto* list : {&hot_ranks_, &other_ranks_}) {
    const auto sorted = std::min<std::ptrdiff_t>(static_cast<std::ptrdiff_t>(list->size()), heaviest_kept);
    std::partial_sort(list->begin(), list->begin() + sorted, list->end(), std::greater<>{});
  }
  choice move{best, -1, -1};
  const int first = node_first(h);
  for (int j = first; j < first + per_node_ && used_ <= budget_; ++j) {
    const expert_id c = row_[j];
    if (c == hot || (c >= 0 && count_[static_cast<std::size_t>(c)] < 2)) continue;
    const double worst = move_worst(j, hot);
    if (worst < move.worst) move = {worst, -1, j};
  }
  return move;
}

// The heaviest rank if slot j held `hot`: the ranks holding j's expert and j's rank re-summed with
// the new counts, the others as before (hot's with its extra replica).
double in_place_search::move_worst(int j, expert_id hot) {
  const expert_id c = row_[j];
  mark_ranks_of(c);
  mark_rank(j / per_rank_);
  spend(static_cast<std::int64_t>(marked_.size()) * (per_rank_ + 1));
  row_[j] = hot;
  add_replicas(c, -1);
  add_replicas(hot, 1);
  double worst = 0.0;
  for (const int k : marked_) worst = std::max(worst, rank_sum(k));
  add_replicas(hot, -1);
  add_replicas(c, 1);
  row_[j] = c;
  worst = std::max({worst, heaviest_unmarked(hot_ranks_), heaviest_unmarked(other_ranks_)});
  unmark();
  return worst;
}

// Slot j takes a replica of `hot`; every rank holding hot or j's old expert is re-summed.
void in_place_search::apply_move(int j, expert_id hot) {
  const expert_id c = row_[j];
  mark_ranks_of(c);
  mark_rank(j / per_rank_);
  if (c >= 0) {
    auto& slots = slots_of_[static_cast<std::size_t>(c)];
    slots.erase(std::find(slots.begin(), slots.end(), j));
    add_replicas(c, -1);
  }
  row_[j] = hot;
  slots_of_[static_cast<std::size_t>(hot)].push_back(j);
  add_replicas(hot, 1);
  mark_ranks_of(hot);
  resum_marked();
}

// Slots i and j trade experts; replica counts stay, so only their two ranks change.
void in_place_search::apply_swap(int i, int j) {
  const auto relabel = [&](expert_id e, int from, int to) {
    if (e < 0) return;
    auto& slots = slots_of_[static_cast<std::size_t>(e)];
    *std::find(slots.begin(), slots.end(), from) = to;
  };
  relabel(row_[i], i, j);
  relabel(row_[j], j, i);
  std::swap(row_[i], row_[j]);
  mark_rank(i / per_rank_);
  mark_rank(j / per_rank_);
  resum_marked();
}

void in_place_search::resum_marked() {
  spend(static_cast<std::int64_t>(marked_.size()) * per_rank_);
  for (const int k : marked_) rank_load_[static_cast<std::size_t>(k)] = rank_sum(k);
  unmark();
}

expert_id in_place_search::hottest(int h) const {
  expert_id hot = -1;
  for (int i = h * per_rank_; i < (h + 1) * per_rank_; ++i) {
    if (row_[i] >= 0 && (hot < 0 || w(row_[i]) > w(hot))) hot = row_[i];
  }
  return hot;
}

// Each step lowers the heaviest rank by the best swap or replica move, whichever lowers it more.
bool in_place_search::run(double target, int max_steps) {
  for (int step = 0; step < max_steps; ++step) {
    if (!spend(static_cast<std::int64_t>(rank_load_.size()) + per_rank_)) return false;
    const auto h = static_cast<int>(std::max_element(rank_load_.begin(), rank_load_.end()) - rank_load_.begin());
    if (rank_load_[static_cast<std::size_t>(h)] <= target) return true;
    const choice swap = best_swap(h);
    const expert_id hot = hottest(h);
    const choice move = hot >= 0 ? best_replica_move(h, hot, swap.worst) : choice{swap.worst, -1, -1};
    if (used_ > budget_) return false;  // the choices may be incomplete
    if (move.j >= 0) {
      apply_move(move.j, hot);
    } else if (swap.i >= 0) {
      apply_swap(swap.i, swap.j);
    } else {
      return false;  // stuck above the target
    }
  }
  return *std::max_element(rank_load_.begin(), rank_load_.end()) <= target;
}

// Work (slot visits) the in-place search may spend on one layer. Its steps cost O(slots) each and
// it may take O(slots) of them, so it needs a bound: a whole call's search stays under
// 2^26 + layers x slots x log2(slots) visits (under a second at the largest shapes check_limits
// allows; one layer of 4,096 slots once took 100 s). Real models stay well inside: DeepSeek-V3's
// global layers (288 slots, 32 ranks) need at most ~0.2M a layer and get 1.2M.
std::int64_t search_budget(std::size_t layers, int slots) {
  return (std::int64_t{1} << 26) / static_cast<std::int64_t>(layers) +
         std::int64_t{slots} * std::bit_width(static_cast<unsigned>(slots));
}

struct layer_shape {
  int nodes, per_node, per_rank, num_ranks, num_groups;
  [[nodiscard]] int node_slots() const { return per_node * per_rank; }
};

// The default's packs placed, nodes first (so every node still holds whole groups) then the ranks
// of each node, on the old blocks that share the most experts with them; kept experts keep slots.
void place_matched(std::span<const expert_id> pack_row, std::span<const expert_id> old_row, std::span<expert_id> row,
                   const layer_shape& s, detail::preserve_scratch& scratch) {
  const int node_slots = s.node_slots();
  const auto node_to = s.nodes == 1 ? std::vector<int>{0} : match_blocks(pack_row, 0, old_row, 0, s.nodes, node_slots);
  for (int a = 0; a < s.nodes; ++a) {
    const int b = node_to[static_cast<std::size_t>(a)];
    const auto rank_to = match_blocks(pack_row, a * node_slots, old_row, b * node_slots, s.per_node, s.per_rank);
    for (int i = 0; i < s.per_node; ++i) {
      const int dst = (b * s.per_node + rank_to[static_cast<std::size_t>(i)]) * s.per_rank;
      std::copy_n(pack_row.begin() + (a * s.per_node + i) * s.per_rank, s.per_rank, row.begin() + dst);
    }
  }
  detail::preserve_rank_slots(row, old_row, s.num_ranks, scratch);
}

// The heaviest rank's load, each expert's load split evenly over its replicas.
double heaviest_rank(std::span<const expert_id> r, std::span<const double> w, int num_ranks) {
  const auto per_rank = r.size() / static_cast<std::size_t>(num_ranks);
  std::vector<int> cnt(w.size(), 0);
  for (expert_id e : r) {
    if (e >= 0) ++cnt[static_cast<std::size_t>(e)];
  }
  std::vector<double> per(static_cast<std::size_t>(num_ranks), 0.0);
  for (std::size_t p = 0; p < r.size(); ++p) {
    if (r[p] >= 0) per[p / per_rank] += w[static_cast<std::size_t>(r[p])] / cnt[static_cast<std::size_t>(r[p])];
  }
  return *std::max_element(per.begin(), per.end());
}

// Whether every group's replicas all sit on one node.
bool groups_whole(std::span<const expert_id> r, int groups, int group_size, int node_slots) {
  std::vector<int> node_of(static_cast<std::size_t>(groups), -1);
  for (std::size_t p = 0; p < r.size(); ++p) {
    if (r[p] < 0) continue;
    auto& n = node_of[static_cast<std::size_t>(r[p] / group_size)];
    const int here = static_cast<int>(p) / node_slots;
    if (n >= 0 && n != here) return false;
    n = here;
  }
  return true;
}

std::int64_t moves(std::span<const expert_id> a, std::span<const expert_id> b) {
  std::int64_t n = 0;
  for (std::size_t p = 0; p < a.size(); ++p) n += a[p] != b[p];
  return n;
}

// An incremental fix of the old placement often moves far fewer slots than the matched packs; it
// replaces them in `row` when it keeps the heaviest rank within 0.5% of theirs (so balancedness
// stays >= 99% of the default's) and moves fewer slots.
void try_in_place(std::span<expert_id> row, std::span<const expert_id> old_row, std::span<const double> w,
                  const layer_shape& s, std::int64_t budget) {
  // Hierarchical mode keeps every group on one node; an old placement without that property
  // (vLLM's round-robin start, say) is not a base to improve on.
  const int groups = s.nodes > 1 ? s.num_groups : 1;
  const bool complete = std::all_of(old_row.begin(), old_row.end(), [](expert_id e) { return e >= 0; });
  if (!complete || (s.nodes > 1 && !groups_whole(old_row, groups, static_cast<int>(w.size()) / groups, s.node_slots())))
    return;
  const double target = heaviest_rank(row, w, s.num_ranks) / 0.995;
  std::vector<expert_id> candidate(old_row.begin(), old_row.end());
  const int slots = static_cast<int>(candidate.size());
  in_place_search search(candidate, w, s.num_ranks, s.nodes, budget);
  if (search.run(target, 4 * slots) && moves(candidate, old_row) < moves(row, old_row)) {
    std::copy(candidate.begin(), candidate.end(), row.begin());
  }
}

}  // namespace

matrix<expert_id> rebalance_min_move(const rebalance_input& in) {
  if (in.old_phy2log == nullptr) return rebalance_default(in);
  check_limits(in);
  validate(in);
  auto fresh_in = in;
  fresh_in.old_phy2log = nullptr;
  const auto packs = rebalance_default(fresh_in);
  const int nodes = in.num_groups % in.num_nodes == 0 ? in.num_nodes : 1;
  const layer_shape shape{nodes, in.num_ranks / nodes, in.num_replicas / in.num_ranks, in.num_ranks, in.num_groups};
  const std::int64_t budget = search_budget(packs.rows(), in.num_replicas);
  matrix<expert_id> out(packs.rows(), packs.cols());
  detail::preserve_scratch scratch;
  std::vector<double> w(in.load.cols());
  std::vector<expert_id> fallback(packs.cols());
  for (std::size_t l = 0; l < packs.rows(); ++l) {
    const auto old_row = in.old_phy2log->row(l);
    auto row = out.row(l);
    place_matched(packs.row(l), old_row, row, shape, scratch);
    for (std::size_t e = 0; e < w.size(); ++e) w[e] = static_cast<double>(static_cast<float>(in.load(l, e)));
    try_in_place(row, old_row, w, shape, budget);
    // Node-first matching is not globally optimal: never move more than the default would. Its
    // answer is its packs with slots preserved (rebalance_default(in)'s row, without a second run).
    std::copy(packs.row(l).begin(), packs.row(l).end(), fallback.begin());
    detail::preserve_rank_slots(fallback, old_row, in.num_ranks, scratch);
    if (moves(fallback, old_row) < moves(row, old_row)) std::copy(fallback.begin(), fallback.end(), row.begin());
  }
  return out;
}

}  // namespace eplb

#include "core/in_place_search.hpp"

#include <algorithm>
#include <bit>
#include <functional>

namespace eplb::detail {

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

std::int64_t search_budget(std::size_t layers, int slots) {
  return (std::int64_t{1} << 26) / static_cast<std::int64_t>(layers) +
         std::int64_t{slots} * std::bit_width(static_cast<unsigned>(slots));
}

}  // namespace eplb::detail

// The in-place search of the move-minimising policy: starting from the old placement of one layer,
// swaps and replica moves lower the heaviest rank until it reaches a target.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "eplb/core/placement.hpp"

namespace eplb::detail {

// min_move's in-place search (try_in_place), made incremental: rank loads always equal, bit for bit,
// what summing each rank's slots in slot order gives (the first version re-summed every rank after
// every change and for every candidate, O(slots^2) a step), but a change re-sums only the ranks
// holding an expert whose replica count changed, or the changed slot. A work budget bounds the
// search on huge layers: past it the search gives up, as when it is stuck, and min_move keeps its
// other candidate.
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

/// Work (slot visits) the in-place search may spend on one layer. Its steps cost O(slots) each and
/// it may take O(slots) of them, so it needs a bound: a whole call's search stays under
/// 2^26 + layers x slots x log2(slots) visits (under a second at the largest shapes check_limits
/// allows; one layer of 4,096 slots once took 100 s). Real models stay well inside: DeepSeek-V3's
/// global layers (288 slots, 32 ranks) need at most ~0.2M a layer and get 1.2M.
[[nodiscard]] std::int64_t search_budget(std::size_t layers, int slots);

}  // namespace eplb::detail

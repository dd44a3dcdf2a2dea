// Expert load: the sliding window of per-step, per-slot token counts, and balancedness.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "eplb/core/matrix.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/export.hpp"

namespace eplb {

/// window_size steps of per-physical-slot token counts for every layer, as a ring. A running
/// total makes folding O(layers x slots) whatever the window size.
class EPLB_API load_window {
 public:
  load_window(int window_size, int layers, int num_physical);

  /// Adds one step of counts (layers x num_physical, row-major); evicts the oldest step when full.
  void record(std::span<const std::int64_t> counts);
  /// Totals over the window per physical slot (layers x num_physical).
  [[nodiscard]] const matrix<std::int64_t>& physical_totals() const noexcept { return totals_; }
  /// Totals per logical expert: each slot's count credited to the expert `where` puts in it.
  [[nodiscard]] matrix<double> logical_load(const placement& where) const;
  [[nodiscard]] int steps_recorded() const noexcept { return filled_; }
  [[nodiscard]] int window_size() const noexcept { return window_size_; }
  void clear();

 private:
  int window_size_;
  int layers_;
  int num_physical_;
  int next_ = 0;
  int filled_ = 0;
  std::vector<std::int64_t> ring_;  // window_size x layers x num_physical
  matrix<std::int64_t> totals_;
};

/// vLLM's balancedness: sum over layers of mean tokens per rank, divided by the sum over layers of
/// the max tokens per rank. `per_slot` is layers x R. 1.0 when there is no load at all.
[[nodiscard]] EPLB_API double balancedness_of_slots(const matrix<double>& per_slot, int num_ranks);

/// Balancedness a placement would give a logical load (layers x E) when every replica of an
/// expert takes an equal share of its tokens (routing picks replicas round-robin).
[[nodiscard]] EPLB_API double balancedness(const placement& where, const matrix<double>& logical_load);
/// Whether moving from `current` to the placement `next` (same shape) is worth it: its balancedness
/// under `logical_load` exceeds `current`'s by more than `min_improvement`.
[[nodiscard]] EPLB_API bool improves_enough(const placement& current, const matrix<expert_id>& next,
                                            const matrix<double>& logical_load, double min_improvement);

}  // namespace eplb

#include "eplb/core/load.hpp"

#include <algorithm>

#include "util/fail.hpp"

namespace eplb {

load_window::load_window(int window_size, int layers, int num_physical)
    : window_size_(window_size), layers_(layers), num_physical_(num_physical) {
  if (window_size <= 0) fail(errc::invalid_argument, "load_window: window_size must be > 0, got {}", window_size);
  if (layers <= 0 || num_physical <= 0) {
    fail(errc::invalid_argument, "load_window: layers ({}) and physical slots ({}) must be > 0", layers, num_physical);
  }
  const auto step = static_cast<std::size_t>(layers) * static_cast<std::size_t>(num_physical);
  ring_.assign(step * static_cast<std::size_t>(window_size), 0);
  totals_ = matrix<std::int64_t>(static_cast<std::size_t>(layers), static_cast<std::size_t>(num_physical), 0);
}

void load_window::record(std::span<const std::int64_t> counts) {
  const std::size_t step = totals_.flat().size();
  if (counts.size() != step) {
    fail(errc::invalid_argument, "load_window::record: got {} counts, expected layers x slots = {} x {} = {}",
         counts.size(), layers_, num_physical_, step);
  }
  auto slot = std::span(ring_).subspan(static_cast<std::size_t>(next_) * step, step);
  auto totals = totals_.flat();
  for (std::size_t i = 0; i < step; ++i) {
    totals[i] += counts[i] - slot[i];
    slot[i] = counts[i];
  }
  next_ = (next_ + 1) % window_size_;
  filled_ = std::min(filled_ + 1, window_size_);
}

matrix<double> load_window::logical_load(const placement& where) const {
  if (where.layers() != layers_ || where.num_physical() != num_physical_) {
    fail(errc::invalid_argument, "load_window::logical_load: placement is {}x{}, window is {}x{}", where.layers(),
         where.num_physical(), layers_, num_physical_);
  }
  matrix<double> out(static_cast<std::size_t>(layers_), static_cast<std::size_t>(where.num_logical()), 0.0);
  for (int l = 0; l < layers_; ++l) {
    const auto map = where.phy2log(l);
    const auto tot = totals_.row(l);
    for (int p = 0; p < num_physical_; ++p) {
      if (map[p] >= 0) out(l, map[p]) += static_cast<double>(tot[p]);
    }
  }
  return out;
}

void load_window::clear() {
  std::fill(ring_.begin(), ring_.end(), 0);
  std::fill(totals_.flat().begin(), totals_.flat().end(), 0);
  next_ = 0;
  filled_ = 0;
}

double balancedness_of_slots(const matrix<double>& per_slot, int num_ranks) {
  if (num_ranks <= 0 || per_slot.cols() % static_cast<std::size_t>(num_ranks) != 0) {
    fail(errc::invalid_argument, "balancedness: {} slots are not divisible by {} ranks", per_slot.cols(), num_ranks);
  }
  const std::size_t per_rank = per_slot.cols() / static_cast<std::size_t>(num_ranks);
  double sum_mean = 0.0;
  double sum_max = 0.0;
  for (std::size_t l = 0; l < per_slot.rows(); ++l) {
    const auto row = per_slot.row(l);
    double total = 0.0;
    double peak = 0.0;
    for (int r = 0; r < num_ranks; ++r) {
      double tokens = 0.0;
      for (std::size_t s = 0; s < per_rank; ++s) tokens += row[r * per_rank + s];
      total += tokens;
      peak = std::max(peak, tokens);
    }
    sum_mean += total / num_ranks;
    sum_max += peak;
  }
  return sum_max > 0.0 ? sum_mean / sum_max : 1.0;
}

double balancedness(const placement& where, const matrix<double>& logical_load) {
  if (logical_load.rows() != static_cast<std::size_t>(where.layers()) ||
      logical_load.cols() != static_cast<std::size_t>(where.num_logical())) {
    fail(errc::invalid_argument, "balancedness: load is {}x{}, placement has {} layers x {} experts",
         logical_load.rows(), logical_load.cols(), where.layers(), where.num_logical());
  }
  matrix<double> per_slot(static_cast<std::size_t>(where.layers()), static_cast<std::size_t>(where.num_physical()));
  for (int l = 0; l < where.layers(); ++l) {
    const auto map = where.phy2log(l);
    for (int p = 0; p < where.num_physical(); ++p) {
      if (map[p] >= 0) per_slot(l, p) = logical_load(l, map[p]) / where.replica_count(l, map[p]);
    }
  }
  return balancedness_of_slots(per_slot, where.num_ranks());
}

bool improves_enough(const placement& current, const matrix<expert_id>& next, const matrix<double>& logical_load,
                     double min_improvement) {
  const placement planned(next, current.num_logical(), current.num_ranks(), "next", current.allows_masked());
  return balancedness(planned, logical_load) > balancedness(current, logical_load) + min_improvement;
}

}  // namespace eplb

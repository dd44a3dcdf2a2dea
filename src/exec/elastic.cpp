// Elastic EP: a placement carried over a change in the number of ranks, so that the usual
// rearrangement moves experts off leaving ranks or onto new ones.
#include "eplb/exec/plan.hpp"
#include "util/fail.hpp"

namespace eplb::exec {
matrix<expert_id> expand_for_scale_down(const matrix<expert_id>& survivors, std::span<const int> mapping,
                                        int slots_per_rank) {
  const int old_ranks = static_cast<int>(mapping.size());
  int new_ranks = 0;
  for (int r : mapping) new_ranks += r >= 0;
  if (survivors.cols() != static_cast<std::size_t>(new_ranks * slots_per_rank)) {
    fail(errc::invalid_map, "scale-down: survivor placement has {} slots, {} surviving ranks x {} slots expected",
         survivors.cols(), new_ranks, slots_per_rank);
  }
  matrix<expert_id> out(survivors.rows(), static_cast<std::size_t>(old_ranks * slots_per_rank), empty_slot);
  for (int r = 0; r < old_ranks; ++r) {
    const int nr = mapping[static_cast<std::size_t>(r)];
    if (nr < -1 || nr >= new_ranks)
      fail(errc::invalid_map, "rank_mapping[{}] = {} is out of range -1..{}", r, nr, new_ranks - 1);
    if (nr < 0) continue;
    for (std::size_t l = 0; l < survivors.rows(); ++l) {
      for (int s = 0; s < slots_per_rank; ++s) out(l, r * slots_per_rank + s) = survivors(l, nr * slots_per_rank + s);
    }
  }
  return out;
}

matrix<expert_id> expand_for_scale_up(const matrix<expert_id>& old_map, std::span<const int> mapping, int new_ranks,
                                      int slots_per_rank) {
  const int old_ranks = static_cast<int>(mapping.size());
  if (old_map.cols() != static_cast<std::size_t>(old_ranks * slots_per_rank)) {
    fail(errc::invalid_map, "scale-up: old placement has {} slots, {} ranks x {} slots expected", old_map.cols(),
         old_ranks, slots_per_rank);
  }
  matrix<expert_id> out(old_map.rows(), static_cast<std::size_t>(new_ranks * slots_per_rank), empty_slot);
  for (int r = 0; r < old_ranks; ++r) {
    const int nr = mapping[static_cast<std::size_t>(r)];
    if (nr < 0 || nr >= new_ranks)
      fail(errc::invalid_map, "rank_mapping[{}] = {} is out of range 0..{}", r, nr, new_ranks - 1);
    for (std::size_t l = 0; l < old_map.rows(); ++l) {
      for (int s = 0; s < slots_per_rank; ++s) out(l, nr * slots_per_rank + s) = old_map(l, r * slots_per_rank + s);
    }
  }
  return out;
}

}  // namespace eplb::exec

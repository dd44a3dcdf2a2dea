// Pieces shared by the placement policies (src/core/policy.cpp, src/core/min_move.cpp).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "eplb/core/placement.hpp"

namespace eplb::detail {

/// Scratch space of preserve_rank_slots, reused across layers.
struct preserve_scratch {
  std::vector<expert_id> fresh;
  std::vector<std::uint64_t> sorted;
  std::vector<std::uint32_t> taken;
  std::vector<char> used, kept;
};

/// vLLM's preserve_intragpu_slots: experts a rank keeps go back to the slots they held; experts new
/// to the rank fill the remaining slots in order. O(slots log slots per rank).
void preserve_rank_slots(std::span<expert_id> row, std::span<const expert_id> old_row, int num_ranks,
                         preserve_scratch& s);

}  // namespace eplb::detail

// Pieces shared by the placement policies (src/core/policy.cpp, src/core/min_move.cpp).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "eplb/core/placement.hpp"

namespace eplb::detail {

/// vLLM's preserve_intragpu_slots: experts a rank keeps go back to the slots they held; experts new
/// to the rank fill the remaining slots in order. The vectors are scratch space.
void preserve_rank_slots(std::span<expert_id> row, std::span<const expert_id> old_row, int num_ranks,
                         std::vector<expert_id>& fresh, std::vector<std::uint64_t>& used, std::vector<char>& kept);

}  // namespace eplb::detail

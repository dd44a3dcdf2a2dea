// Which block (node or rank) of a new placement row goes where: the blocks of the new row are
// matched to those of the old row so that as many experts as possible stay where they are. Used by
// the move-minimising policy (min_move.cpp).
#pragma once

#include <span>
#include <vector>

#include "eplb/core/placement.hpp"

namespace eplb::detail {

/// The assignment of `from`'s blocks to `to`'s blocks that keeps the most experts where they are:
/// result[a] is the block of `to` that block a of `from` takes. Blocks are `size` slots each, the
/// first at from_first / to_first. Exact up to 32 blocks (Hungarian algorithm), near-maximum
/// beyond (heaviest overlaps first), where O(blocks^3) would take minutes.
[[nodiscard]] std::vector<int> match_blocks(std::span<const expert_id> from, int from_first,
                                            std::span<const expert_id> to, int to_first, int blocks, int size);

}  // namespace eplb::detail

// The move-minimising policy: the default policy's packs (hence its balance), placed on the ranks
// that already hold most of each pack (block_matching), or an in-place fix of the old placement
// (in_place_search) when that moves fewer slots.
#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "core/block_matching.hpp"
#include "core/in_place_search.hpp"
#include "core/policy_detail.hpp"
#include "eplb/core/policy.hpp"

namespace eplb {
namespace {

using detail::in_place_search;
using detail::match_blocks;
using detail::search_budget;

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

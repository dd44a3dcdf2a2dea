// Placement policies: from a logical load to a new phy2log.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "eplb/core/matrix.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/export.hpp"

namespace eplb {

enum class policy_kind { deepseek_default, min_move };

/// Parses "default" or "min_move"; anything else is error(errc::invalid_argument) listing them.
[[nodiscard]] EPLB_API policy_kind parse_policy(std::string_view name, std::string_view field = "policy");
[[nodiscard]] EPLB_API std::string_view to_string(policy_kind kind) noexcept;

/// Bound on one layer's total load (rebalance_input::load): the default policy sums loads in float32
/// (as vLLM does), and totals near FLT_MAX (3.4e38) would overflow to inf. Token counts are far below.
inline constexpr double max_layer_load = 1e30;

struct rebalance_input {
  const matrix<double>& load;  ///< layers x logical experts, finite, >= 0, each row's sum < max_layer_load
  int num_replicas;            ///< physical slots per layer, a multiple of num_ranks, >= experts
  int num_groups;              ///< expert groups (group-limited routing); divides the expert count
  int num_nodes;               ///< nodes; hierarchical balancing when num_groups % num_nodes == 0
  int num_ranks;               ///< EP ranks, a multiple of num_nodes in hierarchical mode
  const matrix<expert_id>* old_phy2log = nullptr;  ///< optional: keep experts in their old slots
};

/// Checks the input (loads as documented on rebalance_input, shapes, old_phy2log ids); throws
/// error(errc::invalid_argument) naming the field and the rule.
EPLB_API void validate(const rebalance_input& in);

/// Limits on the shapes the policies take, so that no input, however small, asks for unbounded time
/// or memory: within them the policies cost O(layers x slots x log slots) (at the largest, 1,024
/// layers x 4,096 slots: 0.6 s default, 2 s min_move) and their output stays under ~100 MB: phy2log,
/// and log2phy padded to the most replicas one expert can get, the table eplb_state allocates and
/// `eplb plan` prints. Real models are far inside: DeepSeek-V3 is 58 layers x 256 experts on 288-320
/// slots (about 1M log2phy entries).
/// The log2phy limit, max_log2phy_entries, is in placement.hpp: every placement obeys it too.
inline constexpr int max_ranks = 4096;                    ///< num_ranks
inline constexpr int max_slots_per_layer = 65536;         ///< num_replicas (so experts too)
inline constexpr int max_layers = 1024;                   ///< rows of the load
inline constexpr std::int64_t max_total_slots = 1 << 22;  ///< layers x num_replicas

/// Throws error(errc::invalid_argument) naming the limit a shape exceeds (the limits above and
/// layers x experts x (num_replicas - experts + 1) <= max_log2phy_entries); O(1). The policies call
/// it before anything else; the other rules on the input are validate()'s.
EPLB_API void check_limits(const rebalance_input& in);

/// DeepSeek's EPLB as vLLM's DefaultEplbPolicy runs it, bit for bit: loads are rounded to float32
/// and summed per group in float32 (numpy's pairwise order); per-replica loads are float32 / count
/// in float64. Ties break stably, lower index first (sorts are stable, argmin/argmax take the first).
/// Hierarchical (groups -> nodes, replicate per node, pack per node's GPUs) when
/// num_groups % num_nodes == 0, else global (one group, one node). With an old placement, experts a
/// rank keeps stay in their old slots (vLLM's preserve_intragpu_slots).
[[nodiscard]] EPLB_API matrix<expert_id> rebalance_default(const rebalance_input& in);

/// Nearly the default policy's balance with far fewer moves. Per layer it considers (1) the
/// default's per-rank packs assigned to ranks by maximum-overlap matchings with the old placement
/// (nodes first, so nodes still hold whole groups) with slots preserved, and (2) the old placement
/// improved in place (swaps within a node, a spare replica of a cold expert turned into one of the
/// hottest expert) until its heaviest rank is within 0.5% of the default's; it takes whichever moves
/// fewer slots, never more than the default itself. Balancedness stays >= 99% of the default's.
/// Without an old placement it is the default policy. Cost: matchings of up to 32 blocks are exact,
/// larger ones near-maximum (greedy by overlap, a maximum-cardinality matching per overlap value),
/// and the in-place search stops at a work budget (giving (1)), so a call stays O(slots log slots)
/// per layer plus a constant (under 0.1 s for 4,096 slots on 4,096 ranks; it was 100 s).
[[nodiscard]] EPLB_API matrix<expert_id> rebalance_min_move(const rebalance_input& in);

/// Dispatches on the policy kind.
[[nodiscard]] EPLB_API matrix<expert_id> rebalance(policy_kind kind, const rebalance_input& in);

/// The rule for masked experts (lost with a rank, not loaded back: their bytes exist nowhere):
/// an expert that no slot of `holders` (layers x any number of slots: every slot that holds bytes
/// now) holds gets none in `next` either; the slots a policy gave it are emptied. eplb_state
/// applies it to every plan (rebalances and rescales), with every current slot as `holders`.
EPLB_API void keep_masked_out(matrix<expert_id>& next, const matrix<expert_id>& holders, int num_logical);

}  // namespace eplb

// Elastic EP at the state level (eplb_state::rescale and state_params::join_epoch): the rules a
// change of the rank set must meet, the placements its two rearrangements move to, and the handoff
// a joining rank reads. Pure functions of what every rank holds alike, so every rank computes the
// same placements; state.cpp runs them.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "eplb/comm/store.hpp"
#include "eplb/state.hpp"

namespace eplb::state_detail {

/// A checked rescale: who stays where, who leaves, who joins.
struct rescale_plan {
  int old_size = 0;
  int new_size = 0;
  int slots_per_rank = 0;
  std::vector<int> mapping;        // old rank -> new rank or -1
  std::vector<int> survivor_rank;  // old rank -> its index among the survivors (sorted by new rank), or -1
  int survivors = 0;
  std::vector<int> joiners;  // new ranks that no old rank becomes

  [[nodiscard]] bool leaving() const noexcept { return survivors < old_size; }
  [[nodiscard]] bool joining() const noexcept { return !joiners.empty(); }
};

/// Checks `p` against the current model (errc::invalid_argument naming rescale_params' field):
/// the mapping's length and range, no new rank taken twice, at least one survivor, and enough slots
/// for every expert on the survivors and on the new set.
[[nodiscard]] rescale_plan plan_rescale(const model_desc& model, const rescale_params& p);

/// The model of a set of `ranks` ranks with the same slots per rank. Hierarchical balancing needs
/// nodes that divide the ranks: otherwise one node (as vLLM's elastic scale-down).
[[nodiscard]] model_desc resized_model(const model_desc& model, int ranks);

/// The placement the move off leaving ranks goes to, over the current set: planned for the
/// survivors alone from `total` (layers x experts), keeping what they hold where the policy can,
/// and empty on the leaving ranks.
[[nodiscard]] matrix<expert_id> scale_down_target(const rescale_plan& plan, const config& cfg, const model_desc& model,
                                                  const matrix<expert_id>& current, const matrix<double>& total);
/// The current set's placement carried to the new set: each surviving rank's slots at its new
/// rank, the joining ranks' slots empty.
[[nodiscard]] matrix<expert_id> carry_to_new_set(const rescale_plan& plan, const matrix<expert_id>& current);
/// The placement that fills the joining ranks: planned over the new set from `total`.
[[nodiscard]] matrix<expert_id> scale_up_target(const config& cfg, const model_desc& new_model,
                                                const matrix<expert_id>& carried, const matrix<double>& total);

/// recover(): an expert whose only replicas were on lost ranks, loaded back into `slot` (of the
/// new set's layer) in place of a surplus replica.
struct lost_expert {
  int layer = 0;
  expert_id expert = 0;
  int slot = -1;  // -1: no surplus replica in the layer to give up
};
/// Finds the experts `carried` (the survivors' maps) no longer holds and puts each into the lowest
/// slot that is empty or whose expert has another replica, alike on every rank; returns them all.
[[nodiscard]] std::vector<lost_expert> place_lost_experts(matrix<expert_id>& carried, int num_logical);
/// "layer 0: 3, 7; layer 2: 5" for an error message.
[[nodiscard]] std::string describe(const std::vector<lost_expert>& lost);

/// What a joining rank learns from the set it joins: written by one surviving rank once the
/// leaving ranks are gone, read by every joining rank.
struct rescale_handoff {
  std::int64_t epoch = 0;
  std::int64_t steps = 0;       // metrics::steps of the survivors
  std::int64_t rebalances = 0;  // metrics::rebalances of the survivors (ids continue alike)
  int new_size = 0;
  int num_nodes = 1;  // resized_model()'s: the joining ranks plan with the survivors' nodes
  std::vector<int> joiners;
  matrix<expert_id> phy2log;  // carry_to_new_set()'s placement
};
/// The store prefix of epoch `epoch`'s rank set (0: the state's first set, no prefix).
[[nodiscard]] std::string rank_set_prefix(std::int64_t epoch);
void write_handoff(comm::store& s, const rescale_handoff& h);
/// Waits up to `timeout` for epoch `epoch`'s handoff (errc::timeout naming the epoch).
[[nodiscard]] rescale_handoff read_handoff(comm::store& s, std::int64_t epoch, std::chrono::milliseconds timeout);
void delete_handoff(comm::store& s, std::int64_t epoch) noexcept;
/// A joining rank's params against the handoff (errc::invalid_argument naming the field): its
/// model is the new set's, and its rank one that joins.
void check_joiner(const state_params& p, const rescale_handoff& h);

}  // namespace eplb::state_detail

#include "state/rescale.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "eplb/core/policy.hpp"
#include "eplb/exec/plan.hpp"
#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {

void check_mapping(const rescale_params& p, int old_size, rescale_plan& plan) {
  if (static_cast<int>(p.rank_mapping.size()) != old_size) {
    fail(errc::invalid_argument, "rescale_params.rank_mapping: {} entries, the current set has {} ranks",
         p.rank_mapping.size(), old_size);
  }
  std::vector<int> taken(static_cast<std::size_t>(p.new_size), -1);
  for (int r = 0; r < old_size; ++r) {
    const int nr = p.rank_mapping[static_cast<std::size_t>(r)];
    if (nr < -1 || nr >= p.new_size) {
      fail(errc::invalid_argument, "rescale_params.rank_mapping[{}]: {} is out of range -1..{}", r, nr, p.new_size - 1);
    }
    if (nr < 0) continue;
    auto& by = taken[static_cast<std::size_t>(nr)];
    if (by >= 0) {
      fail(errc::invalid_argument, "rescale_params.rank_mapping[{}]: new rank {} is already rank_mapping[{}]'s", r, nr,
           by);
    }
    by = r;
  }
  plan.survivor_rank.assign(static_cast<std::size_t>(old_size), -1);
  for (int nr = 0; nr < p.new_size; ++nr) {
    const int r = taken[static_cast<std::size_t>(nr)];
    if (r < 0) {
      plan.joiners.push_back(nr);
    } else {
      plan.survivor_rank[static_cast<std::size_t>(r)] = plan.survivors++;
    }
  }
}

// Every expert needs a slot on the set that serves it.
void check_room(const model_desc& model, int ranks, int slots_per_rank, const char* which) {
  if (static_cast<std::int64_t>(ranks) * slots_per_rank < model.shape.num_logical) {
    fail(errc::invalid_argument,
         "rescale_params.new_size: {} has {} ranks x {} slots for {} experts (every expert needs a slot)", which, ranks,
         slots_per_rank, model.shape.num_logical);
  }
}

// `holders`: every slot that holds bytes now (with the leaving ranks' where they leave).
matrix<expert_id> plan_over(const config& cfg, const model_desc& model, const matrix<expert_id>& old,
                            const matrix<double>& total, const matrix<expert_id>& holders) {
  auto next = rebalance(cfg.resolved_policy(), {total, model.shape.num_physical, model.num_groups, model.num_nodes,
                                                model.shape.num_ranks, &old});
  keep_masked_out(next, holders, model.shape.num_logical);
  return next;
}

}  // namespace

rescale_plan plan_rescale(const model_desc& model, const rescale_params& p) {
  rescale_plan plan;
  plan.old_size = model.shape.num_ranks;
  plan.slots_per_rank = model.shape.slots_per_rank();
  if (p.new_size < 1 || p.new_size > max_ranks) {
    fail(errc::invalid_argument, "rescale_params.new_size: {} is out of range 1..{}", p.new_size, max_ranks);
  }
  plan.new_size = p.new_size;
  check_mapping(p, plan.old_size, plan);
  plan.mapping = p.rank_mapping;
  if (plan.survivors == 0) {
    fail(errc::invalid_argument, "rescale_params.rank_mapping: every rank leaves (-1): nobody keeps the experts");
  }
  check_room(model, plan.survivors, plan.slots_per_rank, "the surviving set");
  check_room(model, plan.new_size, plan.slots_per_rank, "the new set");
  return plan;
}

model_desc resized_model(const model_desc& model, int ranks) {
  model_desc out = model;
  const int spr = model.shape.slots_per_rank();
  out.shape.num_ranks = ranks;
  out.shape.num_physical = ranks * spr;
  if (ranks % std::max(1, model.num_nodes) != 0) out.num_nodes = 1;
  if (out.shape.ranks_per_node > 0 && ranks % out.shape.ranks_per_node != 0) out.shape.ranks_per_node = 0;
  return out;
}

namespace {

// Rank r's slots of `current` at rank to[r] (-1: dropped) of a placement of `ranks` ranks, empty
// where no rank lands.
matrix<expert_id> relabel_ranks(const matrix<expert_id>& current, std::span<const int> to, int ranks, int spr) {
  matrix<expert_id> out(current.rows(), static_cast<std::size_t>(ranks * spr), empty_slot);
  for (std::size_t r = 0; r < to.size(); ++r) {
    if (to[r] < 0) continue;
    for (std::size_t l = 0; l < current.rows(); ++l) {
      for (int s = 0; s < spr; ++s) {
        out(l, static_cast<std::size_t>(to[r] * spr + s)) = current(l, r * static_cast<std::size_t>(spr) + s);
      }
    }
  }
  return out;
}

}  // namespace

matrix<expert_id> scale_down_target(const rescale_plan& plan, const config& cfg, const model_desc& model,
                                    const matrix<expert_id>& current, const matrix<double>& total) {
  // The survivors' slots in survivor order: the old placement the policy keeps what it can of.
  const auto kept = relabel_ranks(current, plan.survivor_rank, plan.survivors, plan.slots_per_rank);
  const auto planned = plan_over(cfg, resized_model(model, plan.survivors), kept, total, current);
  return exec::expand_for_scale_down(planned, plan.survivor_rank, plan.slots_per_rank);
}

matrix<expert_id> carry_to_new_set(const rescale_plan& plan, const matrix<expert_id>& current) {
  return relabel_ranks(current, plan.mapping, plan.new_size, plan.slots_per_rank);
}

matrix<expert_id> scale_up_target(const config& cfg, const model_desc& new_model, const matrix<expert_id>& carried,
                                  const matrix<double>& total) {
  return plan_over(cfg, new_model, carried, total, carried);
}

std::vector<lost_expert> place_lost_experts(matrix<expert_id>& carried, int num_logical) {
  std::vector<lost_expert> out;
  std::vector<int> count(static_cast<std::size_t>(num_logical));
  for (std::size_t l = 0; l < carried.rows(); ++l) {
    std::fill(count.begin(), count.end(), 0);
    const auto row = carried.row(l);
    for (expert_id e : row) {
      if (e >= 0) ++count[static_cast<std::size_t>(e)];
    }
    for (expert_id e = 0; e < num_logical; ++e) {
      if (count[static_cast<std::size_t>(e)] > 0) continue;
      lost_expert lost{static_cast<int>(l), e, -1};
      for (std::size_t s = 0; s < row.size(); ++s) {
        // An empty slot, or one whose expert is served elsewhere too.
        if (row[s] >= 0 && count[static_cast<std::size_t>(row[s])] < 2) continue;
        if (row[s] >= 0) --count[static_cast<std::size_t>(row[s])];
        carried(l, s) = e;
        count[static_cast<std::size_t>(e)] = 1;
        lost.slot = static_cast<int>(s);
        break;
      }
      out.push_back(lost);
    }
  }
  return out;
}

std::string describe(const std::vector<lost_expert>& lost) {
  std::string out;
  int layer = -1;
  for (const auto& x : lost) {
    out += x.layer == layer ? fmt::format(", {}", x.expert)
                            : fmt::format("{}layer {}: {}", out.empty() ? "" : "; ", x.layer, x.expert);
    layer = x.layer;
  }
  return out;
}

std::string rank_set_prefix(std::int64_t epoch) {
  return fmt::format("eplb-set-{}", epoch);
}

namespace {
std::string handoff_key(std::int64_t epoch) {
  return fmt::format("eplb-rescale-{}/handoff", epoch);
}
}  // namespace

void write_handoff(comm::store& s, const rescale_handoff& h) {
  nlohmann::json j{{"epoch", h.epoch},           {"steps", h.steps},         {"rebalances", h.rebalances},
                   {"new_size", h.new_size},     {"num_nodes", h.num_nodes}, {"joiners", h.joiners},
                   {"layers", h.phy2log.rows()}, {"slots", h.phy2log.cols()}};
  j["phy2log"] = std::vector<expert_id>(h.phy2log.flat().begin(), h.phy2log.flat().end());
  s.set(handoff_key(h.epoch), j.dump());
}

rescale_handoff read_handoff(comm::store& s, std::int64_t epoch, std::chrono::milliseconds timeout) {
  std::string text;
  try {
    text = s.get(handoff_key(epoch), timeout);
  } catch (const error& e) {
    if (e.code() != errc::timeout) throw;
    fail(errc::timeout,
         "join_epoch {}: the current ranks did not rescale to that epoch within {} ms (they call "
         "eplb_state::rescale; join_epoch is their stats().rank_set_epoch + 1)",
         epoch, timeout.count());
  }
  rescale_handoff h;
  try {
    const auto j = nlohmann::json::parse(text);
    h.epoch = j.at("epoch").get<std::int64_t>();
    h.steps = j.at("steps").get<std::int64_t>();
    h.rebalances = j.at("rebalances").get<std::int64_t>();
    h.new_size = j.at("new_size").get<int>();
    h.num_nodes = j.at("num_nodes").get<int>();
    h.joiners = j.at("joiners").get<std::vector<int>>();
    const auto flat = j.at("phy2log").get<std::vector<expert_id>>();
    h.phy2log = matrix<expert_id>(j.at("layers").get<std::size_t>(), j.at("slots").get<std::size_t>());
    if (flat.size() != h.phy2log.flat().size()) fail(errc::invalid_argument, "phy2log has {} entries", flat.size());
    std::copy(flat.begin(), flat.end(), h.phy2log.flat().begin());
  } catch (const std::exception& e) {
    fail(errc::invalid_argument, "join_epoch {}: the handoff in the store is malformed: {}", epoch, e.what());
  }
  return h;
}

void delete_handoff(comm::store& s, std::int64_t epoch) noexcept {
  try {
    s.erase(handoff_key(epoch));
  } catch (...) {  // NOLINT(bugprone-empty-catch): a key left behind is bounded (one per rescale)
  }
}

void check_joiner(const state_params& p, const rescale_handoff& h) {
  const auto& shape = p.model.shape;
  if (shape.num_ranks != h.new_size) {
    fail(errc::invalid_argument, "eplb_state: model.shape.num_ranks: {}, the set joined at epoch {} has {} ranks",
         shape.num_ranks, h.epoch, h.new_size);
  }
  if (std::find(h.joiners.begin(), h.joiners.end(), p.rank) == h.joiners.end()) {
    fail(errc::invalid_argument,
         "eplb_state: rank: {} is a surviving rank's place in the set of epoch {}, not a joining one", p.rank, h.epoch);
  }
  if (static_cast<std::size_t>(shape.layers) != h.phy2log.rows() ||
      static_cast<std::size_t>(shape.num_physical) != h.phy2log.cols()) {
    fail(errc::invalid_argument,
         "eplb_state: model.shape: {} layers x {} slots, the set joined at epoch {} has {} x {}", shape.layers,
         shape.num_physical, h.epoch, h.phy2log.rows(), h.phy2log.cols());
  }
}

}  // namespace eplb::state_detail

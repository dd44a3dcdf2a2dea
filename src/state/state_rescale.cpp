// eplb_state::rescale and its joining side (state_params::join_epoch): elastic EP at the state
// level. The current set ends what it runs; where ranks leave, the current set is made again under
// its own prefix and moves every expert off them (rescale.hpp plans where to); then the new set is
// made and, where ranks join, fills their slots. Every rank takes the same path: the plans come
// from the maps (identical on every rank) and a load all-reduce, and each rearrangement is voted
// batch by batch, so a failure ends it at the same batch everywhere.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "state/live_set.hpp"
#include "state/rescale.hpp"
#include "state/state_impl.hpp"
#include "state/sync_session.hpp"
#include "state/validate.hpp"
#include "util/fail.hpp"

namespace eplb {

using state_detail::clock_type;

namespace {

// What the new set needs from the engine that the current one cannot give, named by field.
void check_engine_parts(const state_detail::state_recipe& r, const state_detail::rescale_plan& plan,
                        const rescale_params& p) {
  if (r.comm_handed_in && !r.comm_factory && plan.leaving()) {
    fail(errc::invalid_argument,
         "rescale_params.rank_mapping: ranks leave, but the communicator was handed in (state_params::comm) without "
         "comm_factory: eplb cannot make the current set's again to move experts off them");
  }
  if ((r.comm_handed_in || r.comm_factory) && !p.comm_factory) {
    fail(errc::invalid_argument,
         "rescale_params.comm_factory: the state's communicator comes from the engine; give a factory for the new set");
  }
  const std::pair<const std::optional<engine_buffer>&, const std::optional<engine_buffer>&> given[] = {
      {r.buffers.load, p.buffers.load},
      {r.buffers.phy2log, p.buffers.phy2log},
      {r.buffers.log2phy, p.buffers.log2phy},
      {r.buffers.replica_count, p.buffers.replica_count}};
  const char* names[] = {"load", "phy2log", "log2phy", "replica_count"};
  for (std::size_t i = 0; i < std::size(given); ++i) {
    if (given[i].first && !given[i].second) {
      fail(errc::invalid_argument,
           "rescale_params.buffers.{}: the state uses the engine's {} buffer; give one sized for the new set", names[i],
           names[i]);
    }
  }
}

// The recipe of the new set: the engine's new communicator setup, factory and buffers.
state_detail::state_recipe new_set_recipe(state_detail::state_recipe r, rescale_params& p) {
  if (p.comm_setup) r.comm_setup = std::move(*p.comm_setup);
  if (p.comm_factory) r.comm_factory = std::move(p.comm_factory);
  r.comm_handed_in = false;
  r.buffers = p.buffers;
  return r;
}

// Where no window was read yet (or no token came), every expert weighs alike.
matrix<double> or_uniform(const matrix<double>& total) {
  for (double v : total.flat()) {
    if (v != 0) return total;
  }
  return matrix<double>(total.rows(), total.cols(), 1.0);
}

constexpr const char* move_prefix = "eplb-rescale-move";

}  // namespace

std::unique_ptr<eplb_state::impl> eplb_state::impl::next_set(state_detail::state_recipe next_recipe,
                                                             const model_desc& next_model, int next_rank,
                                                             const matrix<expert_id>& phy2log,
                                                             const std::string& prefix) {
  state_params p;
  p.cfg = cfg;
  p.cfg.num_redundant_experts = next_model.shape.num_physical - next_model.shape.num_logical;
  p.model = next_model;
  p.rank = next_rank;
  p.dev = &dev;
  p.serving_stream = &serving;
  p.weights = weights;
  p.store = comm::make_prefix_store(next_recipe.store, prefix);
  p.comm_setup = next_recipe.comm_setup;
  if (p.comm_setup.rendezvous) p.comm_setup.rendezvous = comm::make_prefix_store(p.comm_setup.rendezvous, prefix);
  p.comm_factory = next_recipe.comm_factory;
  p.comm_wrap = next_recipe.comm_wrap;
  p.commit_agreement = next_recipe.commit_agreement;
  p.initial_phy2log = phy2log;
  p.buffers = next_recipe.buffers;
  state_detail::validate(p);
  return std::make_unique<impl>(p, state_detail::carried_state{std::move(next_recipe), m, records});
}

eplb_state::impl::moved eplb_state::impl::rearrange_to(
    const std::string& prefix, const matrix<double>& local,
    const std::function<matrix<expert_id>(const matrix<double>&)>& target) {
  state_detail::sync_session mover(context(comm::make_prefix_store(recipe.store, prefix)), move_prefix);
  state_detail::sync_session::rearrangement_stats st;
  mover.move_to(
      local, [&](const matrix<double>& total) { return target(or_uniform(total)); }, st);
  return {st.layers, st.bytes_received};
}

// Every rank of the current set arrives before any ends what it runs: an async rank still in the
// step before (its background staging from a peer already here) must not see that peer's
// transfers aborted. Nothing changes when a rank does not come in time or came after other steps.
matrix<expert_id> eplb_state::impl::arrive_for(const char* call, const std::string& space) {
  const int spr = model.shape.slots_per_rank();
  const auto posted =
      state_detail::agree_arrivals(*recipe.store, space, rank, model.shape.num_ranks,
                                   state_detail::arrival_of(m.steps, m.rebalances, maps.phy2log(), rank, spr),
                                   cfg.timeout, stopping.get_token(), true);
  if (!posted.all()) {
    state_detail::leave_arrivals(*recipe.store, space, rank);  // no rank reads the posts of a partial decision
    std::vector<int> missing;
    for (int r = 0; r < model.shape.num_ranks; ++r) {
      if (!posted.named(r)) missing.push_back(r);
    }
    fail(errc::timeout,
         "eplb_state::{}: ranks {} did not call {}() within {} ms of their peers; nothing changed, the current set "
         "serves on (retry on every rank)",
         call, fmt::join(missing, ", "), call, cfg.timeout.count());
  }
  for (int r : posted.ranks) {
    const auto steps = posted.post[static_cast<std::size_t>(r)]->steps;
    if (steps == m.steps) continue;
    // The posts stay (a few bytes): a peer may still be reading them.
    fail(errc::invalid_argument,
         "eplb_state::{}: rank {} called it after {} steps, rank {} after {}: call it on every rank between the same "
         "two steps (nothing changed)",
         call, r, steps, rank, m.steps);
  }
  return state_detail::owners_view(posted, spr);
}

rescale_report eplb_state::rescale(rescale_params params) {
  if (impl_->stopped) fail(errc::cancelled, "eplb_state::rescale: the state was stopped");
  // Counted before anything can throw: every call takes one number on every rank, whatever fails
  // where, so that a retry's arrival keys match on every rank.
  const int attempt = impl_->rescale_attempts++;
  const auto begin = clock_type::now();
  const auto plan = state_detail::plan_rescale(impl_->model, params);
  check_engine_parts(impl_->recipe, plan, params);
  const std::int64_t epoch = impl_->m.rank_set_epoch + 1;
  rescale_report out{
      .epoch = epoch, .rank = plan.mapping[static_cast<std::size_t>(impl_->rank)], .num_ranks = plan.new_size};
  const auto space = fmt::format("{}-arrive-{}", state_detail::rank_set_prefix(epoch), attempt);
  const int old_rank = impl_->rank;
  const auto owners = impl_->arrive_for("rescale", space);
  const auto local = impl_->logical_load(impl_->load.last_window());
  impl_->stop_set("ended by eplb_state::rescale()");
  if (plan.leaving()) impl::leave_ranks(impl_, plan, epoch, local, owners, out);
  if (!out.left) {
    impl::fill_new_set(impl_, plan, new_set_recipe(impl_->recipe, params), epoch, local,
                       plan.leaving() ? impl_->maps.phy2log() : owners, out);
  }
  // Every rank read the posts before the moves' first collective. A failed rescale leaves its
  // post (a few bytes), which a slower peer may still be reading.
  state_detail::leave_arrivals(*impl_->recipe.store, space, old_rank);
  out.seconds = std::chrono::duration<double>(clock_type::now() - begin).count();
  impl_->last_rescale = out;
  impl_->records.emit(event_level::info, event_kind::rank_set_changed, impl_->m.steps,
                      out.left ? fmt::format("eplb: this rank left the rank set (epoch {})", epoch)
                               : fmt::format("eplb rank {}: rank set {} of {} ranks ({} layers moved in {:.3f} s)",
                                             out.rank, epoch, out.num_ranks, out.layers_moved, out.seconds));
  return out;
}

// The current set made again under its own prefix moves every expert off the leaving ranks; they
// end there (stopped), the survivors go on to the new set.
void eplb_state::impl::leave_ranks(std::unique_ptr<impl>& self, const state_detail::rescale_plan& plan,
                                   std::int64_t epoch, const matrix<double>& local, const matrix<expert_id>& current,
                                   rescale_report& out) {
  const auto prefix = state_detail::rank_set_prefix(epoch) + "-leaving";
  const auto who = self->who_epoch;  // the leaving set numbers its ranks as the current one does
  self = self->next_set(self->recipe, self->model, self->rank, current, prefix);
  self->m.rank_set_epoch = epoch;  // a failure below leaves this set, the current ranks, in place
  self->who_epoch = who;
  const auto moved = self->rearrange_to(prefix, local, [&](const matrix<double>& total) {
    return state_detail::scale_down_target(plan, self->cfg, self->model, current, total);
  });
  out.layers_moved += moved.layers;
  out.bytes_received += moved.bytes_received;
  if (out.rank >= 0) return;
  out.left = true;
  self->stop_set("this rank left the rank set (eplb_state::rescale)");
  state_detail::erase_identity(*self->recipe.store, who, self->rank);  // no set names this rank any more
  // The engine may free this rank's weights and buffers once rescale() returns: nothing queued on
  // the serving stream may touch them after that.
  self->serving.synchronize(self->cfg.timeout);
}

namespace {

// The lowest new rank a survivor takes: that survivor tells the joining ranks where things stand.
int handoff_writer(const state_detail::rescale_plan& plan) {
  int lowest = plan.new_size;
  for (int r : plan.mapping) {
    if (r >= 0) lowest = std::min(lowest, r);
  }
  return lowest;
}

// Deletes the handoff once the move that the joining ranks took part in has ended (they read it).
struct handoff_cleanup {
  bool writer;
  comm::store& store;
  std::int64_t epoch;
  ~handoff_cleanup() {
    if (writer) state_detail::delete_handoff(store, epoch);
  }
};

}  // namespace

// The new set: the survivors' slots at their new ranks; joining ranks read the handoff and their
// slots are filled by a rearrangement over the new set.
void eplb_state::impl::fill_new_set(std::unique_ptr<impl>& self, const state_detail::rescale_plan& plan,
                                    state_detail::state_recipe recipe, std::int64_t epoch, const matrix<double>& local,
                                    const matrix<expert_id>& current, rescale_report& out) {
  if (!self->stopped) self->stop_set("ended by eplb_state::rescale()");
  const auto carried = state_detail::carry_to_new_set(plan, current);
  const auto next_model = state_detail::resized_model(self->model, plan.new_size);
  const bool writer = plan.joining() && out.rank == handoff_writer(plan);
  if (writer) {
    state_detail::write_handoff(*recipe.store, {epoch, self->m.steps, self->m.rebalances, plan.new_size,
                                                next_model.num_nodes, plan.joiners, carried});
  }
  const handoff_cleanup cleanup{writer, *recipe.store, epoch};
  const std::pair before{self->who_epoch, self->rank};
  self = self->next_set(std::move(recipe), next_model, out.rank, carried, state_detail::rank_set_prefix(epoch));
  self->enter_set(epoch, before);
  if (plan.joining()) self->fill_joiners(epoch, local, carried, out);
}

// The move that fills the joining ranks, on every rank of the new set. Its failure (alike on every
// rank, by the vote) leaves the new set serving: the joining ranks' unfilled slots stay empty.
void eplb_state::impl::fill_joiners(std::int64_t epoch, const matrix<double>& local, const matrix<expert_id>& carried,
                                    rescale_report& out) noexcept {
  try {
    const auto moved = rearrange_to(state_detail::rank_set_prefix(epoch), local, [&](const matrix<double>& total) {
      return state_detail::scale_up_target(cfg, model, carried, total);
    });
    out.layers_moved += moved.layers;
    out.bytes_received += moved.bytes_received;
  } catch (const std::exception& e) {
    try {
      out.fill_error = e.what();
      records.emit(
          event_level::error, event_kind::rescale_fill_failed, m.steps,
          fmt::format("eplb rank {}: filling the joining ranks of rank set {} failed: {}", rank, epoch, e.what()));
    } catch (...) {  // NOLINT(bugprone-empty-catch): out of memory; the set is consistent either way
    }
  }
}

// A joining rank: the set it joins is described by the handoff; it takes part in the move that
// fills its slots, contributing no load.
std::unique_ptr<eplb_state::impl> eplb_state::impl::join(state_params& p) {
  const auto h = state_detail::read_handoff(*p.store, p.join_epoch, p.cfg.timeout);
  state_detail::check_joiner(p, h);
  auto recipe = state_detail::recipe_of(p);
  const auto prefix = state_detail::rank_set_prefix(h.epoch);
  p.model.num_nodes = h.num_nodes;
  p.initial_phy2log = h.phy2log;
  p.store = comm::make_prefix_store(p.store, prefix);
  if (p.comm_setup.rendezvous) p.comm_setup.rendezvous = comm::make_prefix_store(p.comm_setup.rendezvous, prefix);
  metrics m;
  m.steps = h.steps;
  m.rebalances = h.rebalances;
  m.rank_set_epoch = h.epoch;
  state_detail::rebalance_records records(p.rank, p.model.shape.num_ranks, p.cfg.history_size, std::move(p.on_event),
                                          std::move(p.log));
  const auto begin = clock_type::now();
  auto self = std::make_unique<impl>(p, state_detail::carried_state{std::move(recipe), m, std::move(records)});
  const matrix<double> none(static_cast<std::size_t>(p.model.shape.layers),
                            static_cast<std::size_t>(p.model.shape.num_logical), 0.0);
  auto& out = self->last_rescale;
  out = {.epoch = h.epoch, .rank = p.rank, .num_ranks = h.new_size};
  self->fill_joiners(h.epoch, none, h.phy2log, out);
  out.seconds = std::chrono::duration<double>(clock_type::now() - begin).count();
  return self;
}

}  // namespace eplb

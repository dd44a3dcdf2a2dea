// eplb_state::recover: serving on after lost ranks. The survivors agree on who they are and what
// every slot holds (live_set.hpp), load back what only the lost ranks held (state_params::
// reload_expert), mask what they could not (no token routed to it), and become a set of their own
// that re-plans over them.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <sstream>
#include <utility>

#include "state/live_set.hpp"
#include "state/rescale.hpp"
#include "state/state_impl.hpp"
#include "util/fail.hpp"

namespace eplb {

using state_detail::clock_type;

namespace {

void check_recover_inputs(const state_detail::state_recipe& r, const recover_params& p) {
  if (r.comm_handed_in || r.comm_factory) {
    fail(errc::invalid_argument,
         "eplb_state::recover: the communicator comes from the engine (state_params::comm or comm_factory), which "
         "cannot be made for the survivors here; make the survivors' states anew (or use rescale)");
  }
  const bool engine = r.buffers.load || r.buffers.phy2log || r.buffers.log2phy || r.buffers.replica_count;
  if (engine && !p.buffers) {
    fail(errc::invalid_argument,
         "recover_params.buffers: the state uses the engine's buffers; give them for the survivors' size");
  }
}

std::string reloaded_key(const std::string& space, int rank) {
  return fmt::format("{}/reloaded-{}", space, rank);
}

// What one survivor could not load back: "LAYER EXPERT" pairs, then a line saying why.
struct reload_failures {
  std::vector<std::pair<int, int>> experts;
  std::string why;  // the first failure's reason
};

// Rank r's reload outcome; a rank lost after it arrived posts none, and the error names it.
std::string reload_post_of(comm::store& store, const std::string& space, int r, std::chrono::milliseconds timeout) {
  try {
    return store.get(reloaded_key(space, r), timeout);
  } catch (const error& e) {
    if (e.code() != errc::timeout) throw;
    fail(errc::timeout,
         "rank {} posted no reload outcome within {} ms (lost after it arrived?): the slots chosen for the reloads "
         "stay empty on every rank and the maps route nothing there ({})",
         r, timeout.count(), space);
  }
}

// Every survivor posts its failed reloads and reads the others': all learn the same failures.
reload_failures agree_reload_failures(comm::store& store, const std::string& space, int rank, int size,
                                      const reload_failures& mine, std::chrono::milliseconds timeout) {
  std::string post;
  for (const auto& [l, e] : mine.experts) post += fmt::format("{} {} ", l, e);
  store.set(reloaded_key(space, rank), post + "\n" + mine.why);
  reload_failures all;
  for (int r = 0; r < size; ++r) {
    const auto theirs = reload_post_of(store, space, r, timeout);
    const auto cut = theirs.find('\n');
    std::istringstream pairs(theirs.substr(0, cut));
    int l = 0, e = 0;
    while (pairs >> l >> e) all.experts.emplace_back(l, e);
    if (all.why.empty() && cut != std::string::npos && cut + 1 < theirs.size()) {
      all.why = fmt::format("rank {}: {}", r, theirs.substr(cut + 1));
    }
  }
  std::sort(all.experts.begin(), all.experts.end());
  return all;
}

// This rank's reloads of the lost experts placed in its slots; a failure (or no hook) is recorded
// and the others still tried.
reload_failures reload_own(const std::function<void(int, int, int)>& hook,
                           const std::vector<state_detail::lost_expert>& lost, int rank, int spr) {
  reload_failures out;
  for (const auto& x : lost) {
    if (x.slot / spr != rank) continue;
    try {
      if (!hook) fail(errc::invalid_argument, "no state_params::reload_expert hook");
      hook(x.layer, x.expert, x.slot % spr);
    } catch (const std::exception& e) {
      out.experts.emplace_back(x.layer, x.expert);
      if (out.why.empty()) out.why = fmt::format("layer {} expert {}: {}", x.layer, x.expert, e.what());
    }
  }
  return out;
}

// After every rank has read it: a key left behind is a few bytes, so a failed erase is ignored.
void forget_reload_post(comm::store& store, const std::string& space, int rank) {
  if (space.empty()) return;
  try {
    store.erase(reloaded_key(space, rank));
  } catch (...) {  // NOLINT(bugprone-empty-catch)
  }
}

// The lost ranks' identity posts (set `who_epoch`'s numbering) name processes of no set now: the
// new set's rank 0 drops them, so that deaths do not add keys.
void forget_lost_identities(comm::store& store, std::int64_t who_epoch, const rescale_report& out) {
  if (out.rank != 0) return;
  for (int r : out.lost_ranks) state_detail::erase_identity(store, who_epoch, r);
}

std::string describe_masked(const std::vector<masked_expert>& masked) {
  std::vector<state_detail::lost_expert> as_lost;
  for (const auto& x : masked) as_lost.push_back({x.layer, x.expert, -1});
  return state_detail::describe(as_lost);
}

}  // namespace

// Every expert `maps` lacks, loaded back into the slot place_lost_experts picks (alike on every
// rank) by the rank that holds it. One whose reload failed there (or that rank has no hook) is
// masked: its slot ends empty (the bytes there may be half written).
matrix<expert_id> eplb_state::impl::reload_lost(matrix<expert_id> maps, const std::string& space, int rank_in_set,
                                                int set_size, int slots_per_rank, rescale_report& out) {
  const auto lost = state_detail::place_lost_experts(maps, model.shape.num_logical);
  if (lost.empty()) return maps;
  if (std::any_of(lost.begin(), lost.end(), [](const auto& x) { return x.slot < 0; })) {
    fail(errc::internal, "no slot for the lost experts ({}) on {} slots", state_detail::describe(lost), maps.cols());
  }
  const auto failed =
      agree_reload_failures(*recipe.store, space, rank_in_set, set_size,
                            reload_own(recipe.reload_expert, lost, rank_in_set, slots_per_rank), cfg.timeout);
  for (const auto& x : lost) {
    if (!std::binary_search(failed.experts.begin(), failed.experts.end(), std::pair{x.layer, int{x.expert}})) continue;
    maps(static_cast<std::size_t>(x.layer), static_cast<std::size_t>(x.slot)) = empty_slot;
    out.masked.push_back({x.layer, x.expert});
  }
  out.experts_reloaded = static_cast<int>(lost.size() - out.masked.size());
  if (!out.masked.empty()) {
    records.emit(
        event_level::error, event_kind::experts_masked, m.steps,
        fmt::format("eplb rank {}: serving on without {} experts{} not loaded back ({}); no token may be "
                    "routed to them ({})",
                    rank_in_set, out.masked.size(),
                    out.lost_ranks.empty() ? std::string()
                                           : fmt::format(" lost with ranks {} and", fmt::join(out.lost_ranks, ", ")),
                    describe_masked(out.masked), failed.why));
  }
  return maps;
}

// The survivors' maps in the new set's order, with the lost experts loaded back where they can be.
matrix<expert_id> eplb_state::impl::survivors_maps(const state_detail::rescale_plan& plan, std::int64_t epoch,
                                                   const matrix<expert_id>& owners, rescale_report& out) {
  return reload_lost(state_detail::carry_to_new_set(plan, owners), fmt::format("eplb-live-{}", epoch), out.rank,
                     plan.new_size, plan.slots_per_rank, out);
}

rescale_report eplb_state::recover(recover_params params) {
  if (impl_->stopped) fail(errc::cancelled, "eplb_state::recover: the state was stopped");
  const auto begin = clock_type::now();
  auto& s = *impl_;
  check_recover_inputs(s.recipe, params);
  const std::int64_t epoch = s.m.rank_set_epoch + 1;
  const auto local = s.logical_load(s.load.last_window());
  const int old_rank = s.rank;
  s.stop_set("ended by eplb_state::recover()");
  const int spr = s.model.shape.slots_per_rank();
  const auto space = fmt::format("eplb-live-{}", epoch);
  // Survivors learn of a death up to about a timeout apart (one in a transfer that times out,
  // another in an agreement round that waits for it): twice the timeout takes them all in.
  const auto window = 2 * s.cfg.timeout;
  // A peer whose process is gone from this host cannot arrive: no waiting out the window for it.
  const auto posted = state_detail::agree_arrivals(
      *s.recipe.store, space, s.rank, s.model.shape.num_ranks,
      state_detail::arrival_of(s.m.steps, s.m.rebalances, s.maps.phy2log(), s.rank, spr), window, std::stop_token{},
      false, state_detail::peer_gone(*s.recipe.store, s.who_epoch));
  const auto agreed = state_detail::live_set_of(posted, epoch, s.rank, window);
  const auto& live = agreed.ranks;
  s.m.steps = agreed.last_step;  // every survivor goes on from the same step (async ones learn of a death apart)
  s.m.rebalances = agreed.last_rebalance;  // and numbers the next rebalance alike
  rescale_params p{.new_size = static_cast<int>(live.size()),
                   .rank_mapping = std::vector<int>(static_cast<std::size_t>(s.model.shape.num_ranks), -1)};
  rescale_report out{.epoch = epoch, .num_ranks = p.new_size};
  for (int r = 0; r < s.model.shape.num_ranks; ++r) {
    const auto at = std::find(live.begin(), live.end(), r);
    if (at == live.end()) out.lost_ranks.push_back(r);
    p.rank_mapping[static_cast<std::size_t>(r)] = at == live.end() ? -1 : static_cast<int>(at - live.begin());
  }
  out.rank = p.rank_mapping[static_cast<std::size_t>(s.rank)];
  if (p.new_size * spr < s.model.shape.num_logical) {
    fail(errc::peer_failure, "recover: the {} surviving ranks have {} slots for {} experts (ranks {} were lost)",
         p.new_size, p.new_size * spr, s.model.shape.num_logical, fmt::join(out.lost_ranks, ", "));
  }
  const auto plan = state_detail::plan_rescale(s.model, p);
  const auto carried = s.survivors_maps(plan, epoch, state_detail::owners_view(posted, spr), out);
  const auto next_model = state_detail::resized_model(s.model, plan.new_size);
  auto recipe = s.recipe;
  if (params.comm_setup) recipe.comm_setup = params.comm_setup(plan.new_size);
  if (params.buffers) recipe.buffers = params.buffers(plan.new_size);
  const std::pair before{s.who_epoch, s.rank};
  impl_ = s.next_set(std::move(recipe), next_model, out.rank, carried, state_detail::rank_set_prefix(epoch));
  impl_->enter_set(epoch, before);
  forget_lost_identities(*impl_->recipe.store, before.first, out);
  impl_->fill_joiners(epoch, local, carried, out);  // the re-plan over the survivors
  // Every survivor read the posts and the reload outcomes before the re-plan's first collective.
  state_detail::leave_arrivals(*impl_->recipe.store, space, old_rank);
  forget_reload_post(*impl_->recipe.store, space, out.rank);
  out.seconds = std::chrono::duration<double>(clock_type::now() - begin).count();
  impl_->last_rescale = out;
  impl_->records.emit(
      event_level::warning, event_kind::rank_set_changed, impl_->m.steps,
      fmt::format("eplb rank {}: serving on as rank set {} of {} ranks without ranks {} ({} experts "
                  "reloaded)",
                  out.rank, epoch, out.num_ranks, fmt::join(out.lost_ranks, ", "), out.experts_reloaded));
  return out;
}

void eplb_state::impl::commit_rows(const matrix<expert_id>& rows) {
  const auto before = maps.phy2log();
  for (int l = 0; l < model.shape.layers; ++l) {
    const auto row = rows.row(static_cast<std::size_t>(l));
    if (!std::equal(row.begin(), row.end(), before.row(static_cast<std::size_t>(l)).begin())) maps.set_layer(l, row);
  }
  (void)published.publish_changed(maps, before);
}

// The masked experts back, on the same set: every rank arrives (as for rescale), reloads those
// placed in its slots, and all agree on what failed; the changed layers are published in serving-
// stream order, after the reloads the hook queued there.
rescale_report eplb_state::restore_masked() {
  auto& s = *impl_;
  if (s.stopped) fail(errc::cancelled, "eplb_state::restore_masked: the state was stopped");
  const int call = s.restore_calls++;  // before anything can throw (see rescale())
  if (s.m.rebalance_in_flight) {
    fail(errc::invalid_argument,
         "eplb_state::restore_masked: a rebalance is in flight; drain() and step until metrics::rebalance_in_flight is "
         "false on every rank first");
  }
  const auto begin = clock_type::now();
  rescale_report out{.epoch = s.m.rank_set_epoch, .rank = s.rank, .num_ranks = s.model.shape.num_ranks};
  // The maps are alike on every rank here: each returns at once, with no store round.
  if (s.maps.masked().empty()) return out;
  const auto space = fmt::format("{}-restore-{}", state_detail::rank_set_prefix(s.m.rank_set_epoch), call);
  const auto owners = s.arrive_for("restore_masked", space);
  // Every rank arrived here after the previous call ended, and so after it had read every reload
  // outcome of that call: this rank's can go (one key a rank stays, the last call's).
  forget_reload_post(*s.recipe.store, std::exchange(s.last_restore_space, space), s.rank);
  // The slots the reloads go to route nothing while the hook writes them, on every rank alike
  // (all pick them from the same owners' view): a reload that fails, or a peer lost before the
  // ranks agree, leaves no token routed to a half-written slot.
  auto cleared = owners;
  for (const auto& x : state_detail::place_lost_experts(cleared, s.model.shape.num_logical)) {
    cleared(static_cast<std::size_t>(x.layer), static_cast<std::size_t>(x.slot)) = empty_slot;
  }
  s.commit_rows(cleared);
  s.commit_rows(s.reload_lost(owners, space, s.rank, s.model.shape.num_ranks, s.model.shape.slots_per_rank(), out));
  s.m.masked_experts = static_cast<std::int64_t>(s.maps.masked().size());
  // Every rank read the posts before it posted its reloads, which this rank has read.
  state_detail::leave_arrivals(*s.recipe.store, space, s.rank);
  out.seconds = std::chrono::duration<double>(clock_type::now() - begin).count();
  return out;
}

}  // namespace eplb

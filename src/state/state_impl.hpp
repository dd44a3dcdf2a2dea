// eplb_state's insides: the parts one rank set is made of (load_recorder, device_maps, comm_owner,
// a rebalance session) and what a rank set is made again from when rescale() changes it. state.cpp
// runs a step through them; rescale.cpp makes the next set's.
#pragma once

#include <memory>
#include <optional>
#include <stop_token>
#include <string>

#include "eplb/state.hpp"
#include "state/comm_owner.hpp"
#include "state/device_maps.hpp"
#include "state/load_recorder.hpp"
#include "state/records.hpp"
#include "state/rescale.hpp"
#include "state/session.hpp"

namespace eplb {

namespace state_detail {

/// What the engine handed in that a rank set after a rescale is made from again (the rest of
/// state_params is taken apart by the parts).
struct state_recipe {
  std::shared_ptr<comm::store> store;  // the engine's, without the rank set's prefix
  comm::setup comm_setup;
  std::function<std::unique_ptr<comm::communicator>(int)> comm_factory;
  std::function<std::unique_ptr<comm::communicator>(std::unique_ptr<comm::communicator>, int)> comm_wrap;
  std::function<std::int64_t(std::int64_t)> commit_agreement;
  std::function<void(int, int, int)> reload_expert;
  bool comm_handed_in = false;  // state_params::comm: the engine's, for this set only
  engine_buffers buffers;       // which buffers are the engine's
};

/// What a rank set hands to the next one made by rescale(): the recipe, counters and records.
struct carried_state {
  state_recipe recipe;
  metrics m;
  rebalance_records records;
};

[[nodiscard]] state_recipe recipe_of(const state_params& p);

}  // namespace state_detail

struct eplb_state::impl {
  state_detail::state_recipe recipe;  // first: copied out of the params before the parts take them
  config cfg;
  model_desc model;
  int rank;
  device::device& dev;
  device::stream& serving;
  exec::rank_weights weights;
  metrics m;
  state_detail::rebalance_records records;  // before the session, which fills the open record
  placement maps;
  state_detail::load_recorder load;
  state_detail::device_maps published;
  std::stop_source stopping;  // stop(): every store wait of this rank ends (errc::cancelled)
  state_detail::comm_owner comms;
  // Last: destroyed first, while the communicator, maps and weights it works on are alive.
  std::unique_ptr<state_detail::rebalance_session> session;
  std::int64_t since_rebalance;
  std::int64_t start_at = 0;  // async: the step a triggered rebalance starts in (0: none waiting)
  bool stopped = false;
  bool draining = false;           // drain(): no trigger from now on
  int layers_announced = 0;        // of this step's report: in a layers_committed event already
  rescale_report last_rescale;     // of the rescale (or join) that made this set
  int rescale_attempts = 0;        // rescale() calls in this set: each agrees on arrival under its own keys
  std::int64_t who_epoch = 0;      // the set whose numbering this one's ranks have: its eplb-who keys
  int restore_calls = 0;           // restore_masked() calls in this set, likewise
  std::string last_restore_space;  // the last restore_masked() that every rank arrived at; the next erases its post

  /// A first rank set (carry empty) or the next one after a rescale, which goes on from the
  /// carried counters and records: the next rebalance step_interval steps later.
  impl(state_params& p, std::optional<state_detail::carried_state> carry);
  ~impl();
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;

  void step(bool is_dummy, step_report& report);
  void reserve();
  void on_step_failure(const char* what) noexcept;
  /// Ends what this set runs (a rebalance in flight ends as stopped, the transfers are aborted)
  /// and marks it stopped: stop(), and rescale() before it makes the next set.
  void stop_set(const char* why) noexcept;
  /// The session's context, under `store` (a rescale's rearrangement runs under its own prefix).
  [[nodiscard]] state_detail::session_context context(std::shared_ptr<comm::store> store);
  [[nodiscard]] matrix<double> logical_load(const matrix<std::int64_t>& per_slot) const;

  // Elastic EP (state_rescale.cpp).
  /// The next rank set, made from this one's counters and records and `recipe`, after this one
  /// ended (stop_set): `model`, this rank's `rank` in it, the same weights, `phy2log`, its CPU
  /// collectives and communicator rendezvous under `prefix` of the engine's store.
  [[nodiscard]] std::unique_ptr<impl> next_set(state_detail::state_recipe recipe, const model_desc& next_model,
                                               int next_rank, const matrix<expert_id>& phy2log,
                                               const std::string& prefix);
  /// A rescale's rearrangement to target(the load all-reduce of `local`), voted batch by batch;
  /// the CPU collectives under `prefix`. Only while no rebalance is in flight.
  struct moved {
    int layers = 0;
    std::uint64_t bytes_received = 0;
  };
  moved rearrange_to(const std::string& prefix, const matrix<double>& local,
                     const std::function<matrix<expert_id>(const matrix<double>&)>& target);
  /// rescale()'s two halves; each replaces `self` with the set it makes.
  /// Before either (and before restore_masked): every rank of the current set posts under `space`
  /// and reads the others' posts; the owners' view of every slot (identical on every rank). Throws
  /// with nothing changed, naming `call`.
  [[nodiscard]] matrix<expert_id> arrive_for(const char* call, const std::string& space);
  /// `current`: the set's slots as their owners hold them.
  static void leave_ranks(std::unique_ptr<impl>& self, const state_detail::rescale_plan& plan, std::int64_t epoch,
                          const matrix<double>& local, const matrix<expert_id>& current, rescale_report& out);
  static void fill_new_set(std::unique_ptr<impl>& self, const state_detail::rescale_plan& plan,
                           state_detail::state_recipe recipe, std::int64_t epoch, const matrix<double>& local,
                           const matrix<expert_id>& current, rescale_report& out);
  void fill_joiners(std::int64_t epoch, const matrix<double>& local, const matrix<expert_id>& carried,
                    rescale_report& out) noexcept;
  /// recover()'s part before the new set is made: the survivors' maps with the lost experts
  /// loaded back (on this rank by reload_expert), agreed by every survivor.
  [[nodiscard]] matrix<expert_id> survivors_maps(const state_detail::rescale_plan& plan, std::int64_t epoch,
                                                 const matrix<expert_id>& owners, rescale_report& out);
  /// This rank now serves in set `epoch` (its own numbering): counted, and its process posted
  /// (state_detail::post_identity) in place of its post for the set before.
  void enter_set(std::int64_t epoch, std::optional<std::pair<std::int64_t, int>> before);
  /// Sets the layers of `rows` that differ from the maps and publishes them (serving-stream order).
  void commit_rows(const matrix<expert_id>& rows);
  /// Loads the experts `maps` (in this set's order) lacks back through reload_expert into the slots
  /// place_lost_experts picks, agreed under `space`: what failed anywhere is masked (its slot emptied)
  /// and listed in out.masked. The maps with the reloaded experts.
  [[nodiscard]] matrix<expert_id> reload_lost(matrix<expert_id> maps, const std::string& space, int rank_in_set,
                                              int set_size, int slots_per_rank, rescale_report& out);
  /// A joining rank's set (state_params::join_epoch), once its slots are filled.
  [[nodiscard]] static std::unique_ptr<impl> join(state_params& p);

 private:
  static matrix<expert_id> initial_map(const state_params& p);
  void log_balancedness();
  void trigger_rebalance(step_report& report);
  void start_session(step_report& report);
  void end_rebalance_if_idle(step_report& report);
};

}  // namespace eplb

// eplb_state: the serving loop's handle. It owns the parts (state/validate, load_recorder,
// device_maps, comm_owner) and a rebalance session (sync or async, state/session.hpp), and runs
// them in the order step() promises.
#include "eplb/state.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <iostream>

#include "eplb/core/load.hpp"
#include "eplb/core/policy.hpp"
#include "state/live_set.hpp"
#include "state/state_impl.hpp"
#include "state/validate.hpp"
#include "util/fail.hpp"

namespace eplb {

using state_detail::clock_type;

eplb_state::impl::impl(state_params& p, std::optional<state_detail::carried_state> carry)
    : recipe(carry ? std::move(carry->recipe) : state_detail::recipe_of(p)),
      cfg(p.cfg),
      model(p.model),
      rank(p.rank),
      dev(*p.dev),
      serving(*p.serving_stream),
      weights(std::move(p.weights)),
      m(carry ? carry->m : metrics{}),
      records(carry ? std::move(carry->records)
                    : state_detail::rebalance_records(p.rank, p.model.shape.num_ranks, p.cfg.history_size,
                                                      std::move(p.on_event), std::move(p.log))),
      // A set after a recover() may serve without experts lost with a rank (masked); the engine's
      // first map may not.
      maps(initial_map(p), p.model.shape.num_logical, p.model.shape.num_ranks, "initial_phy2log", carry.has_value()),
      load(dev, serving,
           {p.model.shape.layers, p.model.shape.num_physical, p.cfg.window_size, p.cfg.step_interval, m.steps},
           p.buffers.load, p.cfg.timeout),
      published(dev, serving, p.model.shape, p.buffers, p.cfg.timeout),
      comms(p, stopping.get_token()),
      since_rebalance(carry ? 0 : p.cfg.step_interval - p.cfg.step_interval / 4) {
  records.set_rank_set(rank, model.shape.num_ranks);
  m.rebalance_in_flight = false;
  m.masked_experts = static_cast<std::int64_t>(maps.masked().size());  // rebalances keep them out
  session = state_detail::make_session(context(p.store), std::move(p.commit_agreement));
  for (int l = 0; l < model.shape.layers; ++l) published.publish(maps, l);
  // The first rebalance comes when since_rebalance reaches the interval (at step 1 at the earliest).
  load.expect_rebalance_at(m.steps + std::max<std::int64_t>(1, cfg.step_interval - since_rebalance), m.steps);
  serving.synchronize(cfg.timeout);
  if (cfg.reserve_memory) reserve();
}

eplb_state::impl::~impl() {
  session.reset();
  comms.reset();
}

state_detail::session_context eplb_state::impl::context(std::shared_ptr<comm::store> store) {
  return {cfg,
          model,
          rank,
          dev,
          serving,
          weights,
          maps,
          published,
          comms,
          m,
          records,
          std::move(store),
          stopping.get_token()};
}

matrix<expert_id> eplb_state::impl::initial_map(const state_params& p) {
  return p.initial_phy2log ? *p.initial_phy2log
                           : placement::initial(p.model.shape.layers, p.model.shape.num_logical,
                                                p.model.shape.num_physical, p.model.shape.num_ranks)
                                 .phy2log();
}

// Log steps read the counters back (a copy and a pooled event); the line comes in a later step,
// once the copy is done, and gives the balancedness of this rank's load since the previous one.
void eplb_state::impl::log_balancedness() {
  if (m.steps % cfg.log_balancedness_interval == 0) (void)load.begin_log_reading(m.steps);
  const auto since = load.take_log();
  if (!since) return;
  const auto& totals = since->second;
  matrix<double> per_slot(totals.rows(), totals.cols());
  std::transform(totals.flat().begin(), totals.flat().end(), per_slot.flat().begin(),
                 [](std::int64_t v) { return static_cast<double>(v); });
  const double b = balancedness_of_slots(per_slot, model.shape.num_ranks);
  const auto line = fmt::format("eplb rank {} step {}: balancedness {:.4f} (this rank's load since the last line)",
                                rank, since->first, b);
  records.emit(event_level::info, event_kind::balancedness, m.steps, line);
}

// The trigger: the window's end is read back now. Sync mode plans from it in this step; async
// mode starts on every rank load_readback_lag_steps later, when the copy has long finished.
void eplb_state::impl::trigger_rebalance(step_report& report) {
  report.rebalance_started = true;
  ++m.rebalances;
  report.started_id = m.rebalances;
  records.begin(m.rebalances, m.steps);
  load.begin_window(m.steps);
  load.expect_rebalance_at(m.steps + cfg.step_interval, m.steps);
  if (!cfg.use_async) {
    start_session(report);
    return;
  }
  start_at = m.steps + load_readback_lag_steps;
  m.rebalance_in_flight = true;
}

void eplb_state::impl::start_session(step_report& report) {
  start_at = 0;
  m.rebalance_in_flight = false;  // the session says so from here on (async)
  records.started(m.steps);
  const auto& window = load.finish_window();  // waits only if the copy is not done yet
  session->start(logical_load(window), report);
  end_rebalance_if_idle(report);  // sync: it ended in start()
}

// Before a trigger in the same step, so that the record that ends here keeps its own id.
void eplb_state::impl::end_rebalance_if_idle(step_report& report) {
  // A remake happens inside a rebalance (sync: in its load sum; async: on the background), so its
  // event comes before the end of the rebalance that made it.
  records.communicator(comms.generation(), m.steps);
  if (!records.open()) return;
  // Called at most twice a step (after advance and after a sync start), each commit once.
  if (report.layers_committed > layers_announced && records.wants_debug()) {
    records.emit(event_level::debug, event_kind::layers_committed, m.steps,
                 fmt::format("eplb rank {} step {}: {} layers committed", rank, m.steps,
                             report.layers_committed - layers_announced));
  }
  layers_announced = report.layers_committed;
  if (session->ended_this_step_by_failure()) records.failed("the rebalance ended by a failure", false);
  const bool idle = !session->in_flight() && start_at == 0;
  report.finished = records.end_if_idle(idle, report.rebalance_skipped, m.steps, comms.generation(), maps);
  if (report.finished && (report.finished->outcome == rebalance_outcome::failed ||
                          report.finished->outcome == rebalance_outcome::stopped)) {
    ++m.rebalances_failed;
  }
}

// step() threw: a rebalance that was planning or committing failed with it (one triggered but
// not started yet, async, starts as planned: the throw was not its).
void eplb_state::impl::on_step_failure(const char* what) noexcept {
  session->on_step_failure();
  if (!records.open() || start_at != 0) return;
  try {
    records.failed(what, false);
    step_report unused;
    end_rebalance_if_idle(unused);
  } catch (...) {  // NOLINT(bugprone-empty-catch): out of memory; the step's own error is reported
  }
}

matrix<double> eplb_state::impl::logical_load(const matrix<std::int64_t>& per_slot) const {
  matrix<double> out(per_slot.rows(), static_cast<std::size_t>(model.shape.num_logical), 0.0);
  for (int l = 0; l < model.shape.layers; ++l) {
    const auto map = maps.phy2log(l);
    const auto row = per_slot.row(static_cast<std::size_t>(l));
    for (std::size_t s = 0; s < row.size(); ++s) {
      if (map[s] >= 0)
        out(static_cast<std::size_t>(l), static_cast<std::size_t>(map[s])) += static_cast<double>(row[s]);
    }
  }
  return out;
}

void eplb_state::impl::reserve() {
  if (stopped) fail(errc::cancelled, "eplb_state::reserve: the state was stopped");
  auto use = session->reserve_memory();
  use += comms.reserve();
  m.reserved_device_bytes = use.device_bytes;
  m.reserved_pinned_bytes = use.pinned_bytes;
}

void eplb_state::impl::step(bool is_dummy, step_report& report) {
  layers_announced = 0;
  ++m.steps;
  load.end_step(m.steps, is_dummy);
  ++since_rebalance;
  if (cfg.log_balancedness) log_balancedness();
  session->advance(report);
  end_rebalance_if_idle(report);
  if (start_at != 0) {
    if (m.steps >= start_at) start_session(report);
  } else if (!draining && !session->in_flight() && !session->ended_this_step_by_failure() &&
             since_rebalance >= cfg.step_interval) {
    since_rebalance = 0;
    trigger_rebalance(report);
  }
  m.reserve_overflows = session->reserve_overflows();
  report.masked_experts = m.masked_experts;
}

void eplb_state::impl::stop_set(const char* why) noexcept {
  if (stopped) return;
  stopped = true;
  stopping.request_stop();
  session->stop();
  m.reserve_overflows = session->reserve_overflows();  // the background's last ones too
  if (records.open()) {
    try {
      records.failed(why, true);
      (void)records.end_if_idle(true, false, m.steps, comms.generation(), maps);
      ++m.rebalances_failed;
    } catch (...) {  // NOLINT(bugprone-empty-catch): must not throw (an allocation failed)
    }
  }
  m.rebalance_in_flight = false;
}

state_detail::state_recipe state_detail::recipe_of(const state_params& p) {
  return {p.store,         p.comm_setup,      p.comm_factory, p.comm_wrap, p.commit_agreement,
          p.reload_expert, p.comm != nullptr, p.buffers};
}

eplb_state::eplb_state(state_params params) {
  state_detail::validate(params);  // before impl's members take the params apart
  impl_ = params.join_epoch > 0 ? impl::join(params) : std::make_unique<impl>(params, std::nullopt);
  impl_->enter_set(impl_->m.rank_set_epoch, std::nullopt);
}

void eplb_state::impl::enter_set(std::int64_t epoch, std::optional<std::pair<std::int64_t, int>> before) {
  m.rank_set_epoch = epoch;
  who_epoch = epoch;
  state_detail::post_identity(*recipe.store, epoch, rank);
  if (before && *before != std::pair{epoch, rank})
    state_detail::erase_identity(*recipe.store, before->first, before->second);
}

eplb_state::~eplb_state() {
  stop();
}

std::int64_t* eplb_state::load_buffer() const noexcept {
  return impl_->load.buffer();
}

void eplb_state::record_load(int layer, std::span<const std::int64_t> counts) {
  impl_->load.record_host(layer, counts);
}

step_report eplb_state::step(bool is_dummy) {
  auto& s = *impl_;
  if (s.stopped) fail(errc::cancelled, "eplb_state::step: the state was stopped");
  const auto begin = clock_type::now();  // the overhead histogram: two clock reads, no allocation
  step_report report;
  try {
    s.step(is_dummy, report);
  } catch (const std::exception& e) {
    s.on_step_failure(e.what());
    s.records.step_time(std::chrono::duration<double>(clock_type::now() - begin).count());
    throw;
  } catch (...) {
    s.on_step_failure("an unknown exception");
    throw;
  }
  s.records.step_time(std::chrono::duration<double>(clock_type::now() - begin).count());
  return report;
}

void eplb_state::reserve() {
  impl_->reserve();
}

// Bounded by a few store slices and stop_stream_wait, whatever the rebalance was doing (issue 17):
// the store waits end first, then the session tells the peers and aborts the transfers, and the
// serving stream gets a short wait only. Memory queued work may still touch is freed after that
// work by the device (release_after), never by this.
void eplb_state::drain() noexcept {
  if (impl_) impl_->draining = true;
}

void eplb_state::stop() noexcept {
  if (!impl_ || impl_->stopped) return;
  impl_->stop_set("stopped by eplb_state::stop()");
  try {
    impl_->serving.synchronize(std::min(impl_->cfg.timeout, state_detail::stop_stream_wait));
  } catch (...) {
    // stop() must not throw; a failed or busy serving stream is the engine's to report.
  }
}

std::vector<masked_expert> eplb_state::masked_experts() const {
  std::vector<masked_expert> out;
  for (const auto& [layer, expert] : impl_->maps.masked()) out.push_back({layer, expert});
  return out;
}

const placement& eplb_state::maps() const noexcept {
  return impl_->maps;
}
const std::int32_t* eplb_state::device_phy2log() const noexcept {
  return impl_->published.phy2log();
}
const std::int32_t* eplb_state::device_log2phy() const noexcept {
  return impl_->published.log2phy();
}
const std::int32_t* eplb_state::device_replica_count() const noexcept {
  return impl_->published.replica_count();
}
int eplb_state::device_max_replicas() const noexcept {
  return impl_->published.max_replicas();
}
const matrix<std::int64_t>& eplb_state::window_load() const noexcept {
  return impl_->load.last_window();
}
const matrix<double>& eplb_state::global_window_load() const noexcept {
  return impl_->records.last_global_load();
}
const metrics& eplb_state::stats() const noexcept {
  return impl_->m;
}
std::vector<rebalance_record> eplb_state::history() const {
  const auto& h = impl_->records.history();
  return {h.begin(), h.end()};
}
std::string eplb_state::prometheus_text(std::string_view prefix) const {
  return state_detail::prometheus_text(prefix, impl_->rank, impl_->m, impl_->records.totals(),
                                       impl_->comms.generation());
}
comm::backend eplb_state::communicator_kind() const noexcept {
  return impl_->comms.kind();
}
const rescale_report& eplb_state::last_rescale() const noexcept {
  return impl_->last_rescale;
}
int eplb_state::rank() const noexcept {
  return impl_->rank;
}
int eplb_state::num_ranks() const noexcept {
  return impl_->model.shape.num_ranks;
}

}  // namespace eplb

#include "state/async_session.hpp"

#include <fmt/format.h>

#include "eplb/core/load.hpp"
#include "eplb/core/policy.hpp"
#include "runtime/agreement.hpp"
#include "runtime/background_threads.hpp"
#include "runtime/cpu_group.hpp"
#include "state/sync_session.hpp"
#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {

using phase = async_session::phase;

[[nodiscard]] bool allowed(phase from, phase to) noexcept {
  switch (to) {
    case phase::idle:
      return true;  // finished, ended by a failure every rank has seen, or given up
    case phase::deferred:
      return from == phase::idle;
    case phase::staging:
      return from == phase::deferred;
    case phase::failing:
      return from == phase::deferred || from == phase::staging;
    case phase::failing_quiet:
      return from != phase::idle;
  }
  return false;
}

[[nodiscard]] std::string_view name(phase p) noexcept {
  switch (p) {
    case phase::idle:
      return "idle";
    case phase::deferred:
      return "deferred";
    case phase::staging:
      return "staging";
    case phase::failing:
      return "failing";
    case phase::failing_quiet:
      return "failing_quiet";
  }
  return "?";
}

}  // namespace

async_session::async_session(const session_context& ctx, std::function<std::int64_t(std::int64_t)> agreement)
    : ctx_(ctx), agreement_(std::move(agreement)) {
  const auto& shape = ctx.model.shape;
  const auto& cfg = ctx.cfg;
  group_ = std::make_unique<runtime::cpu_group>(comm::make_prefix_store(ctx.store, "eplb-cpu"), ctx.rank,
                                                shape.num_ranks, cfg.timeout, ctx.stop);
  threads_ = std::make_unique<runtime::background_threads>();
  side_ = ctx.dev.create_stream();
  exec::rearrange_options opts{.timeout = cfg.timeout, .register_buffers = cfg.register_buffers};
  opts.pack_within_staging = cfg.reserve_memory;  // alike on every rank: rebalances stay within the reserve
  mover_ = std::make_unique<exec::rearranger>(shape, ctx.rank, ctx.dev, *side_, ctx.comms.get(), opts);
  // validate() keeps staging_bytes at 0 or at least one layer of this rank's slots.
  const std::size_t area = mover_->layer_area_bytes();
  areas_ = cfg.staging_bytes == 0 ? 2 : static_cast<int>(std::max<std::size_t>(1, cfg.staging_bytes / area));
  background_ = std::make_unique<runtime::async_runtime>(*threads_, *mover_, ctx.weights, *group_, ctx.dev, *side_,
                                                         areas_, cfg.timeout);
  if (!agreement_) {
    agree_ = std::make_unique<runtime::lagged_min>(*group_, threads_->pool(), cfg.commit_lag_steps, cfg.timeout);
  }
}

// Ends what may still touch staging before it goes (the io thread and the pool go last, as
// members, once nothing that posts to them is left): the background first (it waits for the
// transfer in flight), then the mover, whose staging the device frees once the streams have passed
// the work queued on it, then the side stream (its worker stops, queued work is cancelled). The
// serving stream reads the staging areas too.
async_session::~async_session() {
  background_->stop();
  background_->release_areas_after(ctx_.serving);
  background_.reset();
  agree_.reset();
  mover_.reset();
  side_.reset();
}

void async_session::enter(phase next) {
  if (!allowed(phase_, next)) {
    fail(errc::internal, "async rebalance: no transition from {} to {}", name(phase_), name(next));
  }
  phase_ = next;
  ctx_.m.rebalance_in_flight = next != phase::idle;
  if (next == phase::idle) deferred_.reset();
}

// The rebalance starts in this step on every rank (its agreement rounds from now on), but one that
// failed (here or on a peer) may still be ending on the background thread: its current transfer or
// device wait finishes within the timeout, then it stops (abandon() cancelled it). The background
// part starts once it has, checked every step, so step() never blocks on it; this rank posts
// "nothing staged" meanwhile.
void async_session::start(const matrix<double>& local_load, step_report& /*report*/) {
  trigger_time_ = clock_type::now();
  before_.reset();
  background_started_ = false;
  if (agree_) agree_->begin(ctx_.m.rebalances);
  std::function<void()> prepare;
  if (ctx_.comms.take_suspect() && ctx_.comms.can_remake()) {
    // On a blocking-pool thread, right after the load all-reduce.
    prepare = [this] {
      ctx_.comms.remake(ctx_.comms.generation() + 1,
                        [this](comm::communicator& fresh) { mover_->set_communicator(fresh); });
    };
  }
  const auto& model = ctx_.model;
  deferred_ = runtime::rebalance_inputs{local_load,       ctx_.maps.phy2log(), ctx_.cfg.resolved_policy(),
                                        model.num_groups, model.num_nodes,     std::move(prepare)};
  // Every rank plans from the same global load, so every rank decides alike.
  ideal_.store(0);
  deferred_->accept = [min = ctx_.cfg.min_improvement, experts = model.shape.num_logical, ranks = model.shape.num_ranks,
                       masked = ctx_.maps.allows_masked(), ideal = &ideal_](
                          const matrix<double>& total, const matrix<expert_id>& old, const matrix<expert_id>& next) {
    ideal->store(balancedness(placement(next, experts, ranks, "planned", masked), total));
    return improves_enough(placement(old, experts, ranks, "old", masked), next, total, min);
  };
  deferred_since_ = clock_type::now();
  committed_ = 0;
  enter(phase::deferred);
  (void)start_background_when_idle();  // not late yet: it was deferred just now
}

// Starts the deferred background part once the previous one has ended. A previous one that does
// not end in time is this rank's failure, returned so that advance() posts it in the agreement in
// this step like any other (throwing here would skip this step's round and put this rank a round
// behind its peers).
std::exception_ptr async_session::start_background_when_idle() {
  if (phase_ != phase::deferred) return nullptr;
  if (background_->busy()) {
    if (clock_type::now() - deferred_since_ <= 2 * ctx_.cfg.timeout) return nullptr;
    return std::make_exception_ptr(error(errc::timeout, fmt::format("the previous rebalance did not end within {} ms "
                                                                    "of being abandoned",
                                                                    2 * ctx_.cfg.timeout.count())));
  }
  background_->start(std::move(*deferred_));  // clears the previous rebalance's global load
  deferred_.reset();
  background_started_ = true;
  enter(phase::staging);
  return nullptr;
}

void async_session::advance(step_report& report) {
  ended_by_failure_ = false;
  if (phase_ == phase::idle) return;
  if (phase_ == phase::failing || phase_ == phase::failing_quiet) {
    advance_failing(report);
  } else {
    advance_running(report);
  }
}

// This rank's part failed; it keeps posting its code until the round that carries the first
// failure (of any rank) comes back, which every rank reads in the same step. Rounds posted before
// the failure still commit here as on the peers (their layers are staged on this rank too), so
// every rank ends with the same maps.
void async_session::advance_failing(step_report& report) {
  note_plan();
  std::optional<std::int64_t> agreed;
  try {
    agreed = agree_->step(failure_code_);
  } catch (...) {
    enter(phase::idle);  // the failure was reported when it happened; a silent peer ends it too
    ended_by_failure_ = true;
    return;
  }
  if (agreed && *agreed < 0) {
    enter(phase::idle);
    ended_by_failure_ = true;  // as on the peers, whose step throws: no new rebalance in this step
    return;
  }
  if (agreed && phase_ == phase::failing) {
    try {
      commit_agreed(*agreed, report);
    } catch (...) {
      enter(phase::failing_quiet);  // reported once; later rounds only post the code
      throw;
    }
  }
}

// The global load arrives with the policy, before any layer is staged: measure the old maps under
// it (before any layer commits) and hand it to the record. A rank that failed before the plan
// came has none (its record keeps 0).
void async_session::note_plan() {
  if (before_ || !background_started_) return;  // until it started, global_load() is the previous one's
  if (const auto total = background_->global_load()) {
    before_ = balancedness(ctx_.maps, *total);
    ctx_.records.planned(*total, *before_, ideal_.load(), background_->plan_seconds());
  }
}

std::optional<std::int64_t> async_session::agree_on(std::int64_t mine) {
  try {
    // Built in: the round of commit_lag_steps steps ago.
    return agreement_ ? agreement_(mine) : agree_->step(mine);
  } catch (...) {
    abandon(mine);
    throw;
  }
}

void async_session::advance_running(step_report& report) {
  const auto start = clock_type::now();
  const auto late = start_background_when_idle();
  // Until it started, the background's state is the previous rebalance's.
  const bool waiting = phase_ == phase::deferred;
  const auto failure = late ? late : waiting ? nullptr : background_->failure();
  // A failed rank says so in the agreement (as -(rank + 2)) so its peers stop too.
  note_plan();  // before a failure ends it: the record keeps the plan's figures
  const std::int64_t mine = failure ? -(ctx_.rank + 2) : waiting ? 0 : background_->staged_layers();
  const auto agreed = agree_on(mine);
  if (agreed && *agreed < 0) enter(phase::idle);  // every rank reads this round in this step
  if (failure) {
    // The peers commit this round's layers in this step: so does this rank (they were staged
    // before the failure), unless the round already carries a failure.
    std::exception_ptr commit_failure;
    if (agreed && *agreed >= 0) {
      try {
        commit_agreed(*agreed, report);
      } catch (...) {
        commit_failure = std::current_exception();
      }
    }
    abandon(mine);
    if (commit_failure && phase_ == phase::failing) enter(phase::failing_quiet);
    fail_with(failure);
  }
  if (agreed && *agreed < 0) {
    abandon(mine);
    const auto r = -*agreed - 2;  // a failure code; past the ranks, a stop's (see stop())
    const int size = ctx_.model.shape.num_ranks;
    fail(errc::peer_failure, "{} rank {}; layers not committed keep their old weights",
         r >= size ? "rebalance ended: stopped on" : "rebalance failed on", r >= size ? r - size : r);
  }
  if (agreed) commit_agreed(*agreed, report);
  auto& m = ctx_.m;
  m.commit_host_seconds_max =
      std::max(m.commit_host_seconds_max, std::chrono::duration<double>(clock_type::now() - start).count());
  m.plan_seconds = background_->plan_seconds();
  if (before_) ctx_.records.plan_seconds(m.plan_seconds);  // written after global_load() on the io thread
  m.stage_seconds_per_layer = background_->stage_seconds();
  if (committed_ == ctx_.model.shape.layers) finish(report);
}

void async_session::fail_with(const std::exception_ptr& failure) const {
  try {
    std::rethrow_exception(failure);
  } catch (const error& e) {
    fail(e.code(), "rebalance failed on rank {}: {}{}", ctx_.rank, e.what(),
         committed_ > 0 ? fmt::format(" ({} layers committed so far; up to {} more of those staged before the "
                                      "failure commit in the next steps, as on the other ranks)",
                                      committed_, ctx_.cfg.commit_lag_steps * max_commits_per_step)
                        : std::string());
  }
}

void async_session::finish(step_report& report) {
  enter(phase::idle);
  report.rebalance_finished = true;
  auto& m = ctx_.m;
  if (background_->skipped()) {
    report.rebalance_skipped = true;
    ++m.rebalances_skipped;
  }
  m.rebalance_seconds = std::chrono::duration<double>(clock_type::now() - trigger_time_).count();
  m.balancedness_before = before_.value_or(0);
  if (const auto total = background_->global_load()) m.balancedness_after = balancedness(ctx_.maps, *total);
}

// Commits the staged layers the agreement allows in this step (every rank reads the same round,
// so every rank commits the same layers here).
void async_session::commit_agreed(std::int64_t agreed, step_report& report) {
  const std::int64_t limit = std::min<std::int64_t>(agreed, committed_ + max_commits_per_step);
  if (committed_ >= limit) return;
  const auto start = clock_type::now();
  for (; committed_ < limit; ++committed_) {
    const auto ready = background_->get(committed_);
    ctx_.serving.wait(ready.ready);
    mover_->commit_layer(ready.staged, ctx_.weights, background_->area(ready.area), ctx_.serving);
    // Released right after its reads are queued: publish() may throw, and an area whose reads
    // were not recorded could be staged into again while they are still queued.
    background_->release(ready.area, ctx_.serving.mark());  // polled, never a host function
    ctx_.maps.set_layer(committed_, ready.staged.new_row);
    ctx_.published.publish(ctx_.maps, committed_);
    ctx_.m.bytes_moved += ready.staged.stats.bytes_received;
    ctx_.records.layer(ready.staged.stats, ctx_.m.steps);
    ++ctx_.m.layers_committed;
    ++report.layers_committed;
  }
  ctx_.records.commit_seconds(std::chrono::duration<double>(clock_type::now() - start).count());
}

// Stops this rank's part of the rebalance. Unless it already ended for everyone, it stays in
// flight (posting `code`) until the agreement shows the failure to every rank in the same step,
// so that all ranks end it, and start the next one, together.
void async_session::abandon(std::int64_t code) {
  deferred_.reset();
  background_->cancel();  // it would wait forever for areas that are never committed
  ctx_.comms.mark_suspect();
  if (phase_ == phase::idle) return;
  if (agreement_) {
    enter(phase::idle);
    return;
  }
  failure_code_ = code < 0 ? code : -(ctx_.rank + 2);
  enter(phase::failing);
}

void async_session::on_step_failure() noexcept {
  if (phase_ != phase::deferred && phase_ != phase::staging) return;
  const std::int64_t code = -(ctx_.rank + 2);
  // Tell the peers: the engine's agreement now; the built-in one from the next step on.
  if (agreement_) {
    try {
      (void)agreement_(code);
    } catch (...) {  // NOLINT(bugprone-empty-catch): the original error is what this rank reports
    }
  }
  // From deferred or staging every transition below is allowed, so enter() does not throw; what
  // can (cancelling the background posts to it: an allocation) must not escape this noexcept
  // function: the rebalance then ends quietly on this rank and its peers learn it by their timeout.
  try {
    abandon(code);
    if (phase_ == phase::failing) enter(phase::failing_quiet);  // a commit or the agreement failed here
  } catch (...) {
    failure_code_ = code;
    if (phase_ != phase::idle && phase_ != phase::failing_quiet) enter(phase::failing_quiet);
  }
}

// ctx_.stop was requested before: every store wait of the background and of the agreement's
// rounds ends within a slice. Then the peers are told, in this order: mid-rebalance, they read this
// rank's failure code from the rounds they wait for next (all in the same step, so they end the
// rebalance together); then the announcement, after which no round key of this rank appears, so
// a peer waiting for any other round fails naming this rank; then the communicator is aborted,
// which ends this rank's transfers and, where the backend can, tells the peers in a transfer with it.
void async_session::stop() noexcept {
  if (in_flight() && agree_) {
    const bool failing = phase_ == phase::failing || phase_ == phase::failing_quiet;
    // A stop posts -(ranks + rank + 2): below every failure code, so the peers' message says stopped.
    agree_->fail_out(failing ? failure_code_ : -(ctx_.model.shape.num_ranks + ctx_.rank + 2));
  }
  group_->announce_stop();
  ctx_.comms.abort(fmt::format("rank {} is stopping", ctx_.rank));
  background_->stop();
}

// The staging areas exist since the background was made; queue_layer's packing buffer is made now.
// The background must be idle: a rebalance that failed may still be ending there.
device::memory_use async_session::reserve_memory() {
  if (phase_ != phase::idle || background_->busy()) {
    fail(errc::invalid_argument,
         "eplb_state::reserve: a rebalance is in flight (phase {}); call it before the first "
         "step() or between rebalances",
         name(phase_));
  }
  auto use = mover_->reserve_memory(true);
  use.add(ctx_.dev.kind() == device::backend_kind::cuda ? device::memory_kind::device : device::memory_kind::host,
          static_cast<std::size_t>(areas_) * mover_->layer_area_bytes());
  return use;
}

std::unique_ptr<rebalance_session> make_session(const session_context& ctx,
                                                std::function<std::int64_t(std::int64_t)> agreement) {
  if (ctx.cfg.use_async) return std::make_unique<async_session>(ctx, std::move(agreement));
  return std::make_unique<sync_session>(ctx);
}

}  // namespace eplb::state_detail

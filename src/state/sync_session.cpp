// The synchronous rebalance: inside the step that triggers it, on the serving stream. A failure
// anywhere (here or on a peer) ends it on every rank at the same batch, because the commit vote
// decides every batch's write; the load sum carries whether any rank's communicator is suspect, so
// every rank re-makes it in the same rebalance, under a generation every rank derives alike.
#include "state/sync_session.hpp"

#include <fmt/format.h>

#include "eplb/core/load.hpp"
#include "eplb/core/policy.hpp"
#include "runtime/commit_vote.hpp"
#include "runtime/cpu_group.hpp"

namespace eplb::state_detail {

sync_session::sync_session(const session_context& ctx) : sync_session(ctx, "eplb-cpu") {}

sync_session::sync_session(const session_context& ctx, const std::string& prefix) : ctx_(ctx) {
  const auto& shape = ctx.model.shape;
  group_ = std::make_unique<runtime::cpu_group>(comm::make_prefix_store(ctx.store, prefix), ctx.rank, shape.num_ranks,
                                                ctx.cfg.timeout, ctx.stop);
  vote_ = std::make_unique<runtime::commit_vote>(comm::make_prefix_store(ctx.store, prefix), ctx.rank, shape.num_ranks,
                                                 ctx.cfg.timeout);
  exec::rearrange_options opts{
      .staging_bytes = ctx.cfg.staging_bytes, .timeout = ctx.cfg.timeout, .register_buffers = ctx.cfg.register_buffers};
  opts.pack_within_staging = ctx.cfg.reserve_memory;  // alike on every rank: rebalances stay within the reserve
  opts.commit_gate = [v = vote_.get()](int layer, int chunk, std::exception_ptr failure) {
    return v->decide(layer, chunk, failure);
  };
  mover_ = std::make_unique<exec::rearranger>(shape, ctx.rank, ctx.dev, ctx.serving, ctx.comms.get(), opts);
}

sync_session::~sync_session() = default;

// On the serving thread, so never inside a rebalance: peers that already started the next one wait
// for this rank's part of the load sum, and learn from the announcement that it never comes.
void sync_session::stop() noexcept {
  group_->announce_stop();
  ctx_.comms.abort(fmt::format("rank {} is stopping", ctx_.rank));
}

void sync_session::start(const matrix<double>& local_load, step_report& report) {
  trigger_time_ = clock_type::now();
  voted(ctx_.m.rebalances, [&](const matrix<expert_id>& old) { run(local_load, old, report); });
}

void sync_session::move_to(const matrix<double>& local_load, const target_fn& target, rearrangement_stats& stats) {
  trigger_time_ = clock_type::now();
  voted(1, [&](const matrix<expert_id>& /*old*/) {
    const auto next = target(global_load(local_load));
    for (const auto& st : mover_->rearrange(ctx_.weights, ctx_.maps, next)) {
      ctx_.published.publish(ctx_.maps, st.layer);
      ++stats.layers;
      stats.bytes_received += st.bytes_received;
      ++ctx_.m.layers_committed;
      ctx_.m.bytes_moved += st.bytes_received;
    }
  });
}

// Runs `body` as rebalance `id` under the commit vote. On a failure (here or on a peer: the vote
// tells every rank at the same batch) every rank keeps the same committed layers and publishes them.
void sync_session::voted(std::int64_t id, const std::function<void(const matrix<expert_id>&)>& body) {
  vote_->begin(id);
  const auto old = ctx_.maps.phy2log();
  try {
    body(old);
  } catch (const std::exception& e) {
    ctx_.comms.mark_suspect();  // every rank fails this rebalance, so every rank re-makes it next time
    vote_->abort(e.what());
    vote_->settle(id);
    const int committed = ctx_.published.publish_changed(ctx_.maps, old);
    ctx_.m.layers_committed += committed;
    ctx_.records.layers_without_stats(committed, ctx_.m.steps);  // their batches' stats went with the failure
    throw;
  }
}

void sync_session::run(const matrix<double>& local, const matrix<expert_id>& old, step_report& report) {
  auto& m = ctx_.m;
  const auto& model = ctx_.model;
  const auto total = global_load(local);
  auto next = rebalance(ctx_.cfg.resolved_policy(), {total, model.shape.num_physical, model.num_groups, model.num_nodes,
                                                     model.shape.num_ranks, &old});
  keep_masked_out(next, old, model.shape.num_logical);
  m.plan_seconds = std::chrono::duration<double>(clock_type::now() - trigger_time_).count();
  m.balancedness_before = balancedness(ctx_.maps, total);
  const double ideal = balancedness(
      placement(next, model.shape.num_logical, model.shape.num_ranks, "planned", ctx_.maps.allows_masked()), total);
  ctx_.records.planned(total, m.balancedness_before, ideal, m.plan_seconds);
  if (!improves_enough(ctx_.maps, next, total, ctx_.cfg.min_improvement)) {
    // Every rank plans from the same global load, so every rank skips alike: no batch is voted.
    m.balancedness_after = m.balancedness_before;
    m.rebalance_seconds = std::chrono::duration<double>(clock_type::now() - trigger_time_).count();
    ++m.rebalances_skipped;
    report.rebalance_skipped = true;
    report.rebalance_finished = true;
    return;
  }
  // Layers are pipelined (transfers of one overlap the copies of its neighbours); a failure
  // leaves the layers before it committed on every rank and the rest untouched.
  for (const auto& st : mover_->rearrange(ctx_.weights, ctx_.maps, next)) {
    m.bytes_moved += st.bytes_received;
    ctx_.records.layer(st, m.steps);
    ctx_.published.publish(ctx_.maps, st.layer);
    ++m.layers_committed;
    ++report.layers_committed;
  }
  m.balancedness_after = balancedness(ctx_.maps, total);
  m.rebalance_seconds = std::chrono::duration<double>(clock_type::now() - trigger_time_).count();
  report.rebalance_finished = true;
}

// The load all-reduce; its last element says whether any rank's communicator is suspect.
matrix<double> sync_session::global_load(const matrix<double>& local) {
  std::vector<double> values(local.flat().begin(), local.flat().end());
  values.push_back(ctx_.comms.take_suspect() ? 1.0 : 0.0);
  auto summed = group_->allreduce_sum(values);
  vote_->forget_previous();  // every rank has ended the previous rebalance: it joined this sum
  if (summed.back() > 0 && ctx_.comms.can_remake()) {
    ctx_.comms.remake(static_cast<int>(ctx_.m.rebalances),
                      [this](comm::communicator& fresh) { mover_->set_communicator(fresh); });
  }
  summed.pop_back();
  matrix<double> total(local.rows(), local.cols());
  std::copy(summed.begin(), summed.end(), total.flat().begin());
  return total;
}

}  // namespace eplb::state_detail

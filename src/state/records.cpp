#include "state/records.hpp"

#include <fmt/format.h>

#include <iostream>

#include "eplb/core/load.hpp"

namespace eplb {

std::string_view to_string(rebalance_outcome o) noexcept {
  switch (o) {
    case rebalance_outcome::committed:
      return "committed";
    case rebalance_outcome::skipped:
      return "skipped";
    case rebalance_outcome::failed:
      return "failed";
    case rebalance_outcome::stopped:
      return "stopped";
  }
  return "?";
}

std::string_view to_string(event_kind k) noexcept {
  switch (k) {
    case event_kind::rebalance_started:
      return "rebalance_started";
    case event_kind::layers_committed:
      return "layers_committed";
    case event_kind::rebalance_finished:
      return "rebalance_finished";
    case event_kind::rebalance_skipped:
      return "rebalance_skipped";
    case event_kind::rebalance_failed:
      return "rebalance_failed";
    case event_kind::communicator_remade:
      return "communicator_remade";
    case event_kind::balancedness:
      return "balancedness";
    case event_kind::rank_set_changed:
      return "rank_set_changed";
    case event_kind::rescale_fill_failed:
      return "rescale_fill_failed";
    case event_kind::experts_masked:
      return "experts_masked";
  }
  return "?";
}

std::string_view to_string(event_level l) noexcept {
  switch (l) {
    case event_level::debug:
      return "debug";
    case event_level::info:
      return "info";
    case event_level::warning:
      return "warning";
    case event_level::error:
      return "error";
  }
  return "?";
}

}  // namespace eplb

namespace eplb::state_detail {

rebalance_records::rebalance_records(int rank, int num_ranks, int history_size, emit_fn on_event,
                                     std::function<void(std::string_view)> log)
    : rank_(rank),
      num_ranks_(num_ranks),
      history_size_(static_cast<std::size_t>(history_size)),
      on_event_(std::move(on_event)),
      log_(std::move(log)) {}

// The hook is the engine's code inside step(): what it throws must not fail the step (a rebalance
// in flight would be abandoned on this rank alone).
void rebalance_records::emit(event_level level, event_kind kind, std::int64_t step, std::string_view message,
                             const rebalance_record* record) {
  try {
    if (on_event_) {
      on_event_(event{level, kind, step, record ? record->id : open_ ? open_->id : 0, message, record});
    } else if (level >= event_level::info) {
      if (log_) {
        log_(message);
      } else if (rank_ == 0) {
        std::cerr << message << '\n';
      }
    }
  } catch (...) {  // NOLINT(bugprone-empty-catch): documented: what the hook throws is dropped
  }
}

void rebalance_records::begin(std::int64_t id, std::int64_t step) {
  open_.emplace();
  open_->id = id;
  open_->trigger_step = step;
  open_->start_step = step;
  open_->bytes_per_peer.assign(static_cast<std::size_t>(num_ranks_), 0);
  global_load_.reset();
  trigger_time_ = std::chrono::steady_clock::now();
  emit(event_level::info, event_kind::rebalance_started, step,
       fmt::format("eplb rank {} step {}: rebalance {} started", rank_, step, id));
}

void rebalance_records::started(std::int64_t step) {
  if (open_) open_->start_step = step;
}

void rebalance_records::planned(const matrix<double>& global_load, double before, double ideal, double plan_seconds) {
  if (!open_) return;
  global_load_ = global_load;
  last_global_load_ = global_load;
  open_->balancedness_before = before;
  open_->balancedness_after = before;
  if (ideal > 0) open_->balancedness_ideal = ideal;
  open_->plan_seconds = plan_seconds;
}

void rebalance_records::layer(const exec::layer_stats& st, std::int64_t step) {
  if (!open_) return;
  auto& r = *open_;
  if (r.first_commit_step < 0) r.first_commit_step = step;
  ++r.layers_committed;
  r.bytes_sent += st.bytes_sent;
  r.bytes_received += st.bytes_received;
  r.bytes_same_node += st.bytes_same_node;
  r.bytes_cross_node += st.bytes_cross_node;
  for (std::size_t p = 0; p < st.bytes_per_peer.size() && p < r.bytes_per_peer.size(); ++p) {
    r.bytes_per_peer[p] += st.bytes_per_peer[p];
  }
  r.transfer_seconds += st.seconds;
}

void rebalance_records::layers_without_stats(int n, std::int64_t step) {
  if (!open_ || n <= 0) return;
  if (open_->first_commit_step < 0) open_->first_commit_step = step;
  open_->layers_committed += n;
}

void rebalance_records::failed(const std::string& what, bool stopped) {
  if (!open_ || open_->outcome == rebalance_outcome::failed || open_->outcome == rebalance_outcome::stopped) return;
  open_->outcome = stopped ? rebalance_outcome::stopped : rebalance_outcome::failed;
  open_->error = what;
}

void rebalance_records::communicator(int generation, std::int64_t step) {
  if (generation == generation_) return;
  generation_ = generation;
  emit(event_level::warning, event_kind::communicator_remade, step,
       fmt::format("eplb rank {} step {}: communicator made again (generation {})", rank_, step, generation));
}

const rebalance_record* rebalance_records::end_if_idle(bool idle, bool skipped, std::int64_t step, int generation,
                                                       const placement& maps) {
  if (!open_ || !idle) return nullptr;
  auto r = std::move(*open_);
  open_.reset();
  if (r.outcome == rebalance_outcome::committed && skipped) r.outcome = rebalance_outcome::skipped;
  r.end_step = step;
  r.communicator_generation = generation;
  r.total_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - trigger_time_).count();
  // After: the maps now (a failed rebalance keeps the layers committed before), under the same load.
  if (global_load_) r.balancedness_after = balancedness(maps, *global_load_);
  global_load_.reset();
  auto& t = totals_;
  ++t.by_outcome[static_cast<std::size_t>(r.outcome)];
  t.bytes_sent += r.bytes_sent;
  t.bytes_received += r.bytes_received;
  t.bytes_same_node += r.bytes_same_node;
  t.bytes_cross_node += r.bytes_cross_node;
  t.rebalance_seconds.observe(r.total_seconds);
  if (history_.size() == history_size_) history_.pop_front();
  history_.push_back(std::move(r));
  const auto& kept = history_.back();
  switch (kept.outcome) {
    case rebalance_outcome::committed:
      emit(event_level::info, event_kind::rebalance_finished, step,
           fmt::format("eplb rank {} step {}: rebalance {} committed {} layers in {:.3f} s; balancedness {:.4f} -> "
                       "{:.4f} (planned {:.4f}, all ranks' load)",
                       rank_, step, kept.id, kept.layers_committed, kept.total_seconds, kept.balancedness_before,
                       kept.balancedness_after, kept.balancedness_ideal),
           &kept);
      break;
    case rebalance_outcome::skipped:
      emit(event_level::info, event_kind::rebalance_skipped, step,
           fmt::format("eplb rank {} step {}: rebalance {} skipped: balancedness {:.4f}, planned {:.4f} (all ranks' "
                       "load)",
                       rank_, step, kept.id, kept.balancedness_before, kept.balancedness_ideal),
           &kept);
      break;
    default:
      emit(kept.outcome == rebalance_outcome::stopped ? event_level::warning : event_level::error,
           event_kind::rebalance_failed, step,
           fmt::format("eplb rank {} step {}: rebalance {} {} after {} layers: {}", rank_, step, kept.id,
                       to_string(kept.outcome), kept.layers_committed, kept.error),
           &kept);
  }
  return &kept;
}

}  // namespace eplb::state_detail

// The synchronous strategy of a rebalance session (see session.hpp and sync_session.cpp).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "eplb/exec/rearrange.hpp"
#include "state/session.hpp"

namespace eplb::runtime {
class cpu_group;
class commit_vote;
}  // namespace eplb::runtime

namespace eplb::state_detail {

class sync_session final : public rebalance_session {
 public:
  explicit sync_session(const session_context& ctx);
  /// Its CPU collectives under `prefix` of ctx.store (a rescale's own rearrangement).
  sync_session(const session_context& ctx, const std::string& prefix);
  ~sync_session() override;

  /// The placement a rescale moves to, from the global load (layers x experts), alike on every rank.
  using target_fn = std::function<matrix<expert_id>(const matrix<double>& total)>;
  struct rearrangement_stats {
    int layers = 0;  ///< committed with a changed placement
    std::uint64_t bytes_received = 0;
  };
  /// One rearrangement to target(the load all-reduce of `local_load`), voted batch by batch as a
  /// rebalance's (eplb_state::rescale). Throws as start() does.
  void move_to(const matrix<double>& local_load, const target_fn& target, rearrangement_stats& stats);

  void start(const matrix<double>& local_load, step_report& report) override;
  void advance(step_report& /*report*/) override {}
  [[nodiscard]] bool in_flight() const noexcept override { return false; }
  [[nodiscard]] bool ended_this_step_by_failure() const noexcept override { return false; }
  void on_step_failure() noexcept override {}
  void stop() noexcept override;
  device::memory_use reserve_memory() override { return mover_->reserve_memory(false); }
  [[nodiscard]] std::int64_t reserve_overflows() const noexcept override { return mover_->overflows(); }

 private:
  void voted(std::int64_t id, const std::function<void(const matrix<expert_id>&)>& body);
  void run(const matrix<double>& local, const matrix<expert_id>& old, step_report& report);
  [[nodiscard]] matrix<double> global_load(const matrix<double>& local);

  session_context ctx_;
  clock_type::time_point trigger_time_;
  std::unique_ptr<runtime::cpu_group> group_;
  std::unique_ptr<runtime::commit_vote> vote_;
  std::unique_ptr<exec::rearranger> mover_;  // last: destroyed first, while the vote it calls lives
};

}  // namespace eplb::state_detail

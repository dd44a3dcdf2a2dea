// The synchronous strategy of a rebalance session (see session.hpp and sync_session.cpp).
#pragma once

#include <memory>

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
  ~sync_session() override;

  void start(const matrix<double>& local_load, step_report& report) override;
  void advance(step_report& /*report*/) override {}
  [[nodiscard]] bool in_flight() const noexcept override { return false; }
  [[nodiscard]] bool ended_this_step_by_failure() const noexcept override { return false; }
  void on_step_failure() noexcept override {}
  void stop() noexcept override;
  device::memory_use reserve_memory() override { return mover_->reserve_memory(false); }
  [[nodiscard]] std::int64_t reserve_overflows() const noexcept override { return mover_->overflows(); }

 private:
  void run(const matrix<double>& local, const matrix<expert_id>& old, step_report& report);
  [[nodiscard]] matrix<double> global_load(const matrix<double>& local);

  session_context ctx_;
  clock_type::time_point trigger_time_;
  std::unique_ptr<runtime::cpu_group> group_;
  std::unique_ptr<runtime::commit_vote> vote_;
  std::unique_ptr<exec::rearranger> mover_;  // last: destroyed first, while the vote it calls lives
};

}  // namespace eplb::state_detail

// The asynchronous strategy of a rebalance session (see session.hpp): a background coroutine
// (runtime::async_runtime) stages layers on a side stream; each step posts how many layers this
// rank has staged into a commit agreement (the minimum over ranks, read commit_lag_steps steps
// later, or the engine's own collective), and every rank commits the agreed layers in the same step.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

#include "eplb/exec/rearrange.hpp"
#include "runtime/async_runtime.hpp"
#include "state/session.hpp"

namespace eplb::runtime {
class background_threads;
class cpu_group;
class lagged_min;
}  // namespace eplb::runtime

namespace eplb::state_detail {

class async_session final : public rebalance_session {
 public:
  /// Where a rebalance is. Every change goes through enter(), which refuses the others.
  enum class phase {
    idle,           ///< none in flight
    deferred,       ///< started on every rank; the background part waits for the previous one to end
    staging,        ///< the background stages layers; agreed ones commit at step boundaries
    failing,        ///< this rank failed: it posts its failure code until the round that carries the
                    ///< first failure comes back; rounds posted before the failure still commit
    failing_quiet,  ///< as failing, but a commit failed here too: rounds only post the code
  };

  async_session(const session_context& ctx, std::function<std::int64_t(std::int64_t)> agreement);
  ~async_session() override;

  void start(const matrix<double>& local_load, step_report& report) override;
  void advance(step_report& report) override;
  [[nodiscard]] bool in_flight() const noexcept override { return phase_ != phase::idle; }
  [[nodiscard]] bool ended_this_step_by_failure() const noexcept override { return ended_by_failure_; }
  void on_step_failure() noexcept override;
  void stop() noexcept override;
  device::memory_use reserve_memory() override;
  [[nodiscard]] std::int64_t reserve_overflows() const noexcept override { return mover_->overflows(); }
  [[nodiscard]] phase current() const noexcept { return phase_; }

 private:
  void enter(phase next);
  void advance_failing(step_report& report);
  void note_plan();
  void advance_running(step_report& report);
  [[nodiscard]] std::optional<std::int64_t> agree_on(std::int64_t mine);
  [[nodiscard]] std::exception_ptr start_background_when_idle();
  [[noreturn]] void fail_with(const std::exception_ptr& failure) const;
  void commit_agreed(std::int64_t agreed, step_report& report);
  void finish(step_report& report);
  void abandon(std::int64_t code);

  session_context ctx_;
  std::function<std::int64_t(std::int64_t)> agreement_;  // the engine's, if it gave one
  phase phase_ = phase::idle;
  bool ended_by_failure_ = false;  // reset at each advance()
  std::int64_t failure_code_ = 0;  // failing, failing_quiet: what this rank posts
  std::optional<runtime::rebalance_inputs> deferred_;
  clock_type::time_point deferred_since_;
  clock_type::time_point trigger_time_;
  int committed_ = 0;                // layers of this rebalance committed so far
  int areas_ = 0;                    // staging areas of the background, allocated when it is made
  std::optional<double> before_;     // balancedness of the old maps under the global load
  bool background_started_ = false;  // this rebalance's background part was started
  std::atomic<double> ideal_{0};     // of the planned placement: written on the io thread before global_load()

  // Members below are torn down explicitly (see the destructor); declared in the order they are made.
  std::unique_ptr<runtime::cpu_group> group_;
  std::unique_ptr<runtime::background_threads> threads_;  // the io thread and the blocking pool
  std::unique_ptr<device::stream> side_;
  std::unique_ptr<exec::rearranger> mover_;
  std::unique_ptr<runtime::async_runtime> background_;
  std::unique_ptr<runtime::lagged_min> agree_;  // unless the engine supplies the agreement
};

}  // namespace eplb::state_detail

// Every background thread of eplb_state's async mode, in one place: one io_context with its thread
// (the rebalance coroutine, device-event and transfer completions) and one bounded pool for calls
// that block (the load all-reduce and the communicator remake of a rebalance, the commit
// agreement's rounds). Users (async_runtime, lagged_min) take it by reference and must stop before
// it does.
#pragma once

#include <functional>
#include <memory>

namespace boost::asio {
class io_context;
}

namespace eplb::runtime {

class blocking_pool;
class post_gate;

class background_threads {
 public:
  /// Threads the pool may start; a rebalance needs one, the agreement one per rebalance whose
  /// rounds still run (an abandoned one's may each wait out the timeout, once), so this leaves room
  /// for more than rebalances can start within one timeout in practice.
  static constexpr int default_blocking_threads = 16;

  /// Its own io_context, run on a thread of its own.
  explicit background_threads(int blocking_threads = default_blocking_threads);
  /// Tests: no io thread; the caller runs `io` (run_one(), poll()). The pool has threads as usual.
  explicit background_threads(boost::asio::io_context& io, int blocking_threads = default_blocking_threads);
  ~background_threads();  // stop()
  background_threads(const background_threads&) = delete;
  background_threads& operator=(const background_threads&) = delete;

  [[nodiscard]] boost::asio::io_context& io() noexcept;
  /// Foreign threads post completions to io() through this; closed by stop().
  [[nodiscard]] const std::shared_ptr<post_gate>& gate() const noexcept;
  [[nodiscard]] blocking_pool& pool() noexcept;
  /// False when the caller runs io() (tests): whoever waits for io work must then run it.
  [[nodiscard]] bool has_io_thread() const noexcept;

  /// Runs the jobs given to it in order, one at a time, on the pool (a job_chain of its own): the
  /// shape a communicator's executor takes, so that its execute_async() batches run here rather
  /// than on a thread of its own. Throws errc::cancelled once stop() ran; this must outlive its holder.
  [[nodiscard]] std::function<void(std::function<void()>)> serial_executor();

  /// Closes the gate, stops the io thread (handlers still queued are dropped: every user has
  /// stopped, so only late completions remain), then lets the pool run its queued jobs and joins
  /// it (bounded: every job's blocking call has a timeout). Idempotent, never throws.
  void stop() noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace eplb::runtime

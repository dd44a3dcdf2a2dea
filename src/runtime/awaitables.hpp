// The coroutine pieces of the async runtime, on an io_context that one thread runs: the gate through
// which foreign threads (stream workers, drivers, the communicator's worker, the blocking pool) post
// completions, the one awaitable for work that reports on such a thread (async_wait_report, with a
// timeout and a cancellation slot), the device-event await built on it, and the ring of staging
// areas. Internal (tests drive them on an io_context of their own).
#pragma once

#include <chrono>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "eplb/device/device.hpp"
#include "util/asio.hpp"

namespace eplb::runtime {

/// Completions from other threads post to the io_context through the gate; once closed (when the
/// io_context's owner stops), a late completion is dropped instead of touching an io_context that
/// may be gone.
class post_gate {
 public:
  explicit post_gate(asio::io_context& io) : io_(&io) {}
  template <typename Fn>
  void post(Fn fn) {
    std::lock_guard lock(mutex_);
    if (io_ != nullptr) asio::post(*io_, std::move(fn));
  }
  void close() noexcept {
    std::lock_guard lock(mutex_);
    io_ = nullptr;
  }

 private:
  std::mutex mutex_;
  asio::io_context* io_;
};

/// Called once, from any thread, when the awaited work is done (nullptr) or failed (its error).
using report_fn = std::function<void(std::exception_ptr)>;

struct wait_options {
  std::string what;                                  ///< names the work in the timeout and cancel errors
  std::optional<std::chrono::milliseconds> timeout;  ///< none: as long as the work takes
  /// False where the work still uses the waiter's state after the wait would end (a transfer into
  /// its buffers, a job that touches it): such a wait ends only when the work reports.
  bool cancellable = true;
};

namespace detail {
void start_report_wait(asio::io_context& io, std::shared_ptr<post_gate> gate, std::function<void(report_fn)> start,
                       wait_options opts, asio::any_completion_handler<void(std::exception_ptr)> handler);
}

/// The one awaitable for work that completes on another thread: calls `start(report)` at once
/// (start hands `report` to the work: an event's notify(), execute_async(), a pool job) and
/// completes when the work reports, the timeout passes, or the wait is cancelled.
/// Resumes on: the io_context's thread, always through a handler of its own (never inside the
/// initiating call); `report` itself only posts through `gate`, from whatever thread calls it.
/// Cancellation: terminal or partial cancellation through the handler's slot (emitted on the io
/// thread) ends the wait at once with errc::cancelled ("{what} cancelled"), unless
/// opts.cancellable is false; the work runs on and its report is dropped.
/// Errors: what the work reports, as it is; errc::timeout ("{what} not done within {timeout} ms");
/// errc::cancelled; what `start` throws. A report after the end, or after the gate closed, is dropped.
template <asio::completion_token_for<void(std::exception_ptr)> Token>
auto async_wait_report(asio::io_context& io, std::shared_ptr<post_gate> gate, std::function<void(report_fn)> start,
                       wait_options opts, Token&& token) {
  return asio::async_initiate<Token, void(std::exception_ptr)>(
      [&io](auto handler, std::shared_ptr<post_gate> g, std::function<void(report_fn)> s, wait_options o) {
        detail::start_report_wait(io, std::move(g), std::move(s), std::move(o), std::move(handler));
      },
      token, std::move(gate), std::move(start), std::move(opts));
}

/// Completes when `e` does and rethrows its failure, or fails with errc::timeout ("{what} not done
/// within {timeout} ms") when `timeout` passes first. async_wait_report on e.notify(): resumes on
/// the io thread; cancellation ends the wait with errc::cancelled (the event is not touched).
asio::awaitable<void> await_event(asio::io_context& io, std::shared_ptr<post_gate> gate, device::event e,
                                  std::chrono::milliseconds timeout, std::string what);

/// As await_event, for an event made by stream::mark(), which runs notify() callbacks only once a
/// query() or wait() has seen it complete: polls query() on the io thread (every 50 us, doubling
/// up to 1 ms) until it completes, `timeout` passes (errc::timeout) or the awaiting coroutine is
/// cancelled (errc::cancelled). An event already complete costs one query and no suspension.
/// Resumes on: the io thread.
asio::awaitable<void> poll_event(asio::io_context& io, device::event e, std::chrono::milliseconds timeout,
                                 std::string what);

/// The staging areas of a rebalance (touched on the io thread only). acquire() takes the oldest free
/// area, waiting while none is free, then waits for the serving stream's last read of it; release()
/// hands a committed area back with that read's event (a stream::mark(): the step that commits
/// queues no host function on the engine's stream, so acquire() polls it). cancel() makes a waiting or later acquire()
/// with no free area fail with errc::cancelled and `reason`. reset() starts a new rebalance: every
/// area is free again (also those a failed rebalance staged and never had committed; their last
/// serving reads are still awaited) and the cancel is forgotten.
class staging_ring {
 public:
  staging_ring(asio::io_context& io, std::shared_ptr<post_gate> gate, int areas, std::chrono::milliseconds timeout);

  /// Resumes on the io thread. Errors: errc::cancelled (cancel(), or cancellation of the
  /// coroutine while no area is free); the serving read's failure or errc::timeout (poll_event).
  asio::awaitable<int> acquire();
  void release(int area, device::event consumed);
  void cancel(std::string reason);
  void reset();
  [[nodiscard]] bool cancelled() const noexcept { return cancelled_; }
  [[nodiscard]] std::size_t free_count() const noexcept { return free_.size(); }

 private:
  void wake();

  asio::io_context& io_;
  std::shared_ptr<post_gate> gate_;
  std::chrono::milliseconds timeout_;
  std::deque<int> free_;
  std::vector<device::event> consumed_;  // per area: the serving stream's last read of it
  report_fn waiter_;                     // the acquire() waiting for a free area, if any
  bool cancelled_ = false;
  std::string reason_;
};

}  // namespace eplb::runtime

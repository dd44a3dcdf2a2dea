// The coroutine pieces of the async runtime, on an io_context that the caller runs: the gate through
// which foreign threads (stream workers, drivers, the communicator's worker) post completions, the
// device-event await with its timeout, and the ring of staging areas. Internal (tests drive them on
// an io_context of their own).
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "eplb/device/device.hpp"
#include "util/asio.hpp"

namespace eplb::runtime {

/// Completions from other threads post to the io_context through the gate; once closed (stop()),
/// a late completion is dropped instead of touching an io_context that may be gone.
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

/// Completes when `e` does and rethrows its failure, or fails with errc::timeout ("{what} not done
/// within {timeout} ms") when `timeout` passes first. The event's callback only posts through `gate`.
asio::awaitable<void> await_event(asio::io_context& io, std::shared_ptr<post_gate> gate, device::event e,
                                  std::chrono::milliseconds timeout, std::string what);

/// The staging areas of a rebalance (touched on the io thread only). acquire() takes the oldest free
/// area, waiting while none is free, then waits for the serving stream's last read of it; release()
/// hands a committed area back with that read's event. cancel() makes a waiting or later acquire()
/// with no free area fail with errc::cancelled and `reason`. reset() starts a new rebalance: every
/// area is free again (also those a failed rebalance staged and never had committed; their last
/// serving reads are still awaited) and the cancel is forgotten.
class staging_ring {
 public:
  staging_ring(asio::io_context& io, std::shared_ptr<post_gate> gate, int areas, std::chrono::milliseconds timeout);

  asio::awaitable<int> acquire();
  void release(int area, device::event consumed);
  void cancel(std::string reason);
  void reset();
  [[nodiscard]] bool cancelled() const noexcept { return cancelled_; }
  [[nodiscard]] std::size_t free_count() const noexcept { return free_.size(); }

 private:
  asio::io_context& io_;
  std::shared_ptr<post_gate> gate_;
  std::chrono::milliseconds timeout_;
  std::deque<int> free_;
  std::vector<device::event> consumed_;  // per area: the serving stream's last read of it
  std::shared_ptr<asio::steady_timer> waiter_;
  bool cancelled_ = false;
  std::string reason_;
};

}  // namespace eplb::runtime

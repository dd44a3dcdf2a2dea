// The shared state behind device::event: completion, failure, and callbacks waiting for it.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <vector>

#include "eplb/device/device.hpp"

namespace eplb::device::detail {

class event_state {
 public:
  virtual ~event_state() = default;

  /// Marks completion (with a failure or not) and runs the callbacks, outside the lock.
  void complete(std::exception_ptr failure) noexcept;
  /// Backends whose host-side completion can lag the device (CUDA) override this to ask the driver.
  virtual bool poll() { return done(); }
  bool done() const;
  std::exception_ptr failure() const;
  void add_callback(std::function<void(std::exception_ptr)> fn);
  /// Waits on the host-side flag until `deadline`; false on timeout.
  bool wait_until(std::chrono::steady_clock::time_point deadline) const;

 protected:
  mutable std::mutex mutex_;
  mutable std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr failure_;
  std::vector<std::function<void(std::exception_ptr)>> callbacks_;
};

}  // namespace eplb::device::detail

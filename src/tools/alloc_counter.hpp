// An engine's allocator stand-in for the tools: an allocator hook on a device that takes memory
// from the device's own backend (allocate_direct) and counts every allocation, so that `eplb
// simulate` can report how many allocations rebalances made after eplb_state::reserve().
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "eplb/device/device.hpp"

namespace eplb::tools {

class alloc_counter {
 public:
  /// Routes `dev`'s allocations through a new counter; `dev` must outlive every allocate() through
  /// it (frees do not touch it: each block goes back through its own buffer).
  static std::shared_ptr<alloc_counter> install(device::device& dev) {
    auto counter = std::make_shared<alloc_counter>();
    dev.set_allocator({[counter, d = &dev](std::size_t bytes, device::memory_kind kind) -> void* {
                         auto b = d->allocate_direct(bytes, kind);
                         std::byte* p = b.data();
                         std::lock_guard lock(counter->mutex_);
                         counter->live_.emplace(p, std::move(b));
                         ++counter->count_;
                         return p;
                       },
                       [counter](void* p, std::size_t, device::memory_kind) {
                         device::buffer b;
                         std::lock_guard lock(counter->mutex_);
                         auto it = counter->live_.find(static_cast<std::byte*>(p));
                         if (it == counter->live_.end()) return;
                         b = std::move(it->second);  // freed by the backend after the lock is released
                         counter->live_.erase(it);
                       }});
    return counter;
  }

  /// Allocations made through the hook so far.
  [[nodiscard]] std::int64_t count() const {
    std::lock_guard lock(mutex_);
    return count_;
  }

 private:
  mutable std::mutex mutex_;
  std::map<std::byte*, device::buffer> live_;
  std::int64_t count_ = 0;
};

}  // namespace eplb::tools

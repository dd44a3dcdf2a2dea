// Deadlines from timeouts without overflow: steady_clock::now() + timeout overflows (undefined
// behaviour, in practice a deadline in the past) for timeouts near milliseconds::max(), because
// the clock counts nanoseconds. deadline_after() saturates at time_point::max() instead.
#pragma once

#include <chrono>

namespace eplb {

/// steady_clock::now() + timeout, capped at time_point::max(); a timeout <= 0 gives now().
[[nodiscard]] inline std::chrono::steady_clock::time_point deadline_after(std::chrono::milliseconds timeout) noexcept {
  using clock = std::chrono::steady_clock;
  const auto now = clock::now();
  if (timeout <= std::chrono::milliseconds::zero()) return now;
  // Compared in milliseconds: converting `timeout` to the clock's nanoseconds could itself overflow.
  const auto room = std::chrono::duration_cast<std::chrono::milliseconds>(clock::time_point::max() - now);
  if (timeout >= room) return clock::time_point::max();
  return now + timeout;
}

}  // namespace eplb

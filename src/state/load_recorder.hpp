// The per-step expert load of one rank: the device buffer the engine's router increments, a ring of
// pinned copies drained at step boundaries without a host wait, and the window of recent steps the
// policy reads. Serving thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <span>
#include <vector>

#include "eplb/core/load.hpp"
#include "eplb/device/device.hpp"

namespace eplb::state_detail {

class load_recorder {
 public:
  load_recorder(device::device& dev, device::stream& serving, int layers, int num_physical, int window_size,
                std::chrono::milliseconds timeout);

  /// layers x physical slots of int64 counts: device memory on CUDA, host memory on the host device.
  [[nodiscard]] std::int64_t* buffer() const noexcept;
  /// Adds host-side counts (one per physical slot) to the current step of `layer`.
  void record_host(int layer, std::span<const std::int64_t> counts);
  /// Ends a step: copies the buffer into a free ring slot and clears it, in stream order; folds the
  /// slots whose copies are done into the window. Dummy steps count as steps but add no load.
  void drain(bool dummy);
  /// Folds every pending slot (waiting for its copy) and the host counts: the window is up to date.
  void flush();
  [[nodiscard]] const load_window& window() const noexcept { return window_; }

 private:
  void fold_one(bool wait);

  struct pending_copy {
    int slot;
    bool dummy;
    device::event copied;
  };
  int num_physical_;
  std::size_t count_;
  std::chrono::milliseconds timeout_;
  device::stream& serving_;
  load_window window_;
  // stream_buffers: after a timed-out wait the serving stream may still touch them, so they are
  // freed only once it has passed what was queued.
  device::stream_buffer load_;
  std::vector<device::stream_buffer> ring_;
  std::deque<pending_copy> pending_;
  int next_slot_ = 0;
  std::vector<std::int64_t> host_extra_;
  std::vector<std::int64_t> folded_;
};

}  // namespace eplb::state_detail

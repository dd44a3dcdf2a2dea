// The maps the engine's router kernels read, in device memory (host memory on the host device):
// phy2log [layers x slots], log2phy [layers x experts x max_replicas] padded with -1 and replica
// counts [layers x experts], all int32. Each layer is written through a pinned mirror region and
// copied out in stream order on the serving stream. Serving thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include "eplb/core/placement.hpp"
#include "eplb/device/device.hpp"
#include "eplb/exec/model.hpp"

namespace eplb::state_detail {

class device_maps {
 public:
  device_maps(device::device& dev, device::stream& serving, const exec::model_shape& shape,
              std::chrono::milliseconds timeout);

  /// Writes layer `layer` of `maps` into its mirror region and queues its copy to the device.
  void publish(const placement& maps, int layer);
  /// publish() of every layer whose phy2log row differs from `before`'s.
  int publish_changed(const placement& maps, const matrix<expert_id>& before);

  [[nodiscard]] const std::int32_t* phy2log() const noexcept { return as_int32(phy2log_); }
  [[nodiscard]] const std::int32_t* log2phy() const noexcept { return as_int32(log2phy_); }
  [[nodiscard]] const std::int32_t* replica_count() const noexcept { return as_int32(counts_); }
  [[nodiscard]] int max_replicas() const noexcept { return max_rep_; }

 private:
  static const std::int32_t* as_int32(const device::stream_buffer& b) noexcept {
    return reinterpret_cast<const std::int32_t*>(b.data());
  }

  device::stream& serving_;
  std::chrono::milliseconds timeout_;
  std::size_t slots_;    // physical slots per layer
  std::size_t experts_;  // logical experts per layer
  int max_rep_;
  device::stream_buffer phy2log_, log2phy_, counts_;
  device::stream_buffer pin_phy2log_, pin_log2phy_, pin_counts_;
  std::vector<device::event> copied_;  // per layer: the last copy out of its mirror region
};

}  // namespace eplb::state_detail

// The maps the engine's router kernels read, in device memory (host memory on the host device):
// phy2log [layers x slots], log2phy [layers x experts x max_replicas] padded with -1 and replica
// counts [layers x experts], each eplb's own (int32) or the engine's (int32 or int64). Each layer
// is written in the map's element type into a pinned mirror region and copied out in stream order
// on the serving stream, so int64 maps need no kernel. Serving thread only.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <vector>

#include "eplb/core/placement.hpp"
#include "eplb/device/device.hpp"
#include "eplb/exec/model.hpp"
#include "eplb/state.hpp"

namespace eplb::state_detail {

class device_maps {
 public:
  device_maps(device::device& dev, device::stream& serving, const exec::model_shape& shape,
              const engine_buffers& engine, std::chrono::milliseconds timeout);

  /// Writes layer `layer` of `maps` into its mirror region and queues its copy to the device.
  void publish(const placement& maps, int layer);
  /// publish() of every layer whose phy2log row differs from `before`'s.
  int publish_changed(const placement& maps, const matrix<expert_id>& before);

  /// The int32 maps (eplb's own or the engine's); nullptr for a map the engine gave as int64.
  [[nodiscard]] const std::int32_t* phy2log() const noexcept { return as_int32(maps_[0]); }
  [[nodiscard]] const std::int32_t* log2phy() const noexcept { return as_int32(maps_[1]); }
  [[nodiscard]] const std::int32_t* replica_count() const noexcept { return as_int32(maps_[2]); }
  [[nodiscard]] int max_replicas() const noexcept { return max_rep_; }

 private:
  // One map: where the router reads it, its element type, its entries per layer, and its mirror.
  struct map_buffer {
    std::byte* target = nullptr;
    element_type type = element_type::int32;
    std::size_t per_layer = 0;
    device::stream_buffer own;  // eplb's, unless the engine gave its own
    device::stream_buffer mirror;
  };
  static const std::int32_t* as_int32(const map_buffer& m) noexcept {
    return m.type == element_type::int32 ? reinterpret_cast<const std::int32_t*>(m.target) : nullptr;
  }
  void write(map_buffer& m, std::size_t layer, std::span<const std::int32_t> values);

  device::stream& serving_;
  std::chrono::milliseconds timeout_;
  std::size_t experts_;  // logical experts per layer
  int max_rep_;
  std::array<map_buffer, 3> maps_;     // phy2log, log2phy, replica counts
  std::vector<std::int32_t> row_;      // one layer of one map, before its element type
  std::vector<device::event> copied_;  // per layer: the last copy out of its mirror region
};

}  // namespace eplb::state_detail

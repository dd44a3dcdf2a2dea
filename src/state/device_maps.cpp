#include "state/device_maps.hpp"

#include <algorithm>

namespace eplb::state_detail {

device_maps::device_maps(device::device& dev, device::stream& serving, const exec::model_shape& shape,
                         std::chrono::milliseconds timeout)
    : serving_(serving),
      timeout_(timeout),
      slots_(static_cast<std::size_t>(shape.num_physical)),
      experts_(static_cast<std::size_t>(shape.num_logical)),
      max_rep_(shape.num_physical - shape.num_logical + 1) {
  const auto mem = dev.kind() == device::backend_kind::cuda ? device::memory_kind::device : device::memory_kind::host;
  const auto layers = static_cast<std::size_t>(shape.layers);
  const auto width = static_cast<std::size_t>(max_rep_);
  const auto both = [&](device::stream_buffer& live, device::stream_buffer& mirror, std::size_t bytes) {
    live = device::stream_buffer(dev, serving, bytes, mem);
    mirror = device::stream_buffer(dev, serving, bytes, device::memory_kind::pinned);
  };
  both(phy2log_, pin_phy2log_, layers * slots_ * 4);
  both(log2phy_, pin_log2phy_, layers * experts_ * width * 4);
  both(counts_, pin_counts_, layers * experts_ * 4);
  copied_.resize(layers);
}

void device_maps::publish(const placement& maps, int layer) {
  const auto l = static_cast<std::size_t>(layer);
  const auto R = slots_;
  const auto E = experts_;
  const auto W = static_cast<std::size_t>(max_rep_);
  auto& done = copied_[l];
  if (done.valid()) done.wait(timeout_);  // the region's previous copy has long finished
  auto* p2l = reinterpret_cast<std::int32_t*>(pin_phy2log_.data()) + l * R;
  auto* l2p = reinterpret_cast<std::int32_t*>(pin_log2phy_.data()) + l * E * W;
  auto* cnt = reinterpret_cast<std::int32_t*>(pin_counts_.data()) + l * E;
  const auto row = maps.phy2log(layer);
  std::copy(row.begin(), row.end(), p2l);
  std::fill(l2p, l2p + E * W, -1);
  for (std::size_t e = 0; e < E; ++e) {
    cnt[e] = maps.replica_count(layer, static_cast<int>(e));
    const auto slots = maps.log2phy(layer, static_cast<int>(e));
    std::copy_n(slots.begin(), std::min<std::size_t>(slots.size(), W), l2p + e * W);
  }
  serving_.copy(phy2log_.data() + l * R * 4, p2l, R * 4);
  serving_.copy(log2phy_.data() + l * E * W * 4, l2p, E * W * 4);
  serving_.copy(counts_.data() + l * E * 4, cnt, E * 4);
  done = serving_.record();
}

int device_maps::publish_changed(const placement& maps, const matrix<expert_id>& before) {
  int changed = 0;
  for (int l = 0; l < maps.layers(); ++l) {
    const auto row = maps.phy2log(l);
    if (!std::equal(row.begin(), row.end(), before.row(static_cast<std::size_t>(l)).begin())) {
      publish(maps, l);
      ++changed;
    }
  }
  return changed;
}

}  // namespace eplb::state_detail

#include "state/device_maps.hpp"

#include <algorithm>

#include "state/engine_buffers.hpp"

namespace eplb::state_detail {

device_maps::device_maps(device::device& dev, device::stream& serving, const exec::model_shape& shape,
                         const engine_buffers& engine, std::chrono::milliseconds timeout)
    : serving_(serving),
      timeout_(timeout),
      experts_(static_cast<std::size_t>(shape.num_logical)),
      max_rep_(shape.num_physical - shape.num_logical + 1) {
  const auto mem = dev.kind() == device::backend_kind::cuda ? device::memory_kind::device : device::memory_kind::host;
  const auto layers = static_cast<std::size_t>(shape.layers);
  const std::array<const std::optional<engine_buffer>*, 3> given{&engine.phy2log, &engine.log2phy,
                                                                 &engine.replica_count};
  const std::array<std::size_t, 3> per_layer{static_cast<std::size_t>(shape.num_physical),
                                             experts_ * static_cast<std::size_t>(max_rep_), experts_};
  for (std::size_t i = 0; i < maps_.size(); ++i) {
    auto& m = maps_[i];
    m.per_layer = per_layer[i];
    if (given[i]->has_value()) {
      m.type = (*given[i])->type;
      m.target = static_cast<std::byte*>((*given[i])->data);
    }
    const std::size_t bytes = layers * m.per_layer * element_size(m.type);
    if (m.target == nullptr) {
      m.own = device::stream_buffer(dev, serving, bytes, mem);
      m.target = m.own.data();
    }
    m.mirror = device::stream_buffer(dev, serving, bytes, device::memory_kind::pinned);
  }
  copied_.resize(layers);
}

// The layer's values into its mirror region in the map's element type, and its copy out.
void device_maps::write(map_buffer& m, std::size_t layer, std::span<const std::int32_t> values) {
  const std::size_t bytes = m.per_layer * element_size(m.type);
  std::byte* mirror = m.mirror.data() + layer * bytes;
  store_elements(mirror, m.type, values);
  serving_.copy(m.target + layer * bytes, mirror, bytes);
}

void device_maps::publish(const placement& maps, int layer) {
  const auto l = static_cast<std::size_t>(layer);
  const auto E = experts_;
  const auto W = static_cast<std::size_t>(max_rep_);
  auto& done = copied_[l];
  if (done.valid()) done.wait(timeout_);  // the region's previous copy has long finished
  const auto p2l = maps.phy2log(layer);
  row_.assign(p2l.begin(), p2l.end());
  write(maps_[0], l, row_);
  row_.assign(E * W, -1);
  for (std::size_t e = 0; e < E; ++e) {
    const auto slots = maps.log2phy(layer, static_cast<int>(e));
    std::copy_n(slots.begin(), std::min<std::size_t>(slots.size(), W),
                row_.begin() + static_cast<std::ptrdiff_t>(e * W));
  }
  write(maps_[1], l, row_);
  row_.resize(E);
  for (std::size_t e = 0; e < E; ++e) row_[e] = maps.replica_count(layer, static_cast<int>(e));
  write(maps_[2], l, row_);
  done = serving_.mark();  // no host function on the serving stream (commits happen in steps)
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

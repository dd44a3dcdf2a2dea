// What the rearrangement moves: per layer, the expert bundle of every local slot of this rank.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "eplb/device/device.hpp"
#include "eplb/export.hpp"

namespace eplb::exec {

/// One per-expert tensor of a layer (w13, w2, block scales, biases...). Slot s of this rank starts
/// at base + s * stride; bytes_per_expert of it belong to the expert. All layers share the bundle.
struct tensor_spec {
  std::string name;
  std::size_t bytes_per_expert = 0;
  std::size_t stride = 0;  ///< bytes between consecutive slots, >= bytes_per_expert
  device::memory_kind memory = device::memory_kind::device;
};

struct EPLB_API model_shape {
  int layers = 0;
  int num_logical = 0;
  int num_physical = 0;  ///< slots per layer over all ranks
  int num_ranks = 0;
  int ranks_per_node = 0;  ///< for same-node / cross-node statistics; 0 = all on one node
  std::vector<tensor_spec> bundle;

  [[nodiscard]] int slots_per_rank() const { return num_physical / num_ranks; }
  /// Bytes of one expert over the whole bundle.
  [[nodiscard]] std::size_t expert_bytes() const;
  /// Throws error(errc::invalid_argument) naming the field when the shape is inconsistent.
  void validate() const;
};

/// This rank's live expert weights: base[layer][tensor] points at local slot 0 of that tensor.
struct rank_weights {
  std::vector<std::vector<std::byte*>> base;

  [[nodiscard]] std::byte* slot(const model_shape& m, int layer, int tensor, int local_slot) const {
    return base[static_cast<std::size_t>(layer)][static_cast<std::size_t>(tensor)] +
           static_cast<std::size_t>(local_slot) * m.bundle[static_cast<std::size_t>(tensor)].stride;
  }
};

}  // namespace eplb::exec

#include "state/engine_buffers.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <string_view>

#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {

struct named_buffer {
  std::string_view field;
  const std::optional<engine_buffer>* buffer;
  std::size_t elements;
};

void check_one(const named_buffer& b, const device::device& dev) {
  const auto& buf = **b.buffer;
  if (buf.type != element_type::int32 && buf.type != element_type::int64) {
    fail(errc::invalid_argument, "buffers.{}: element type {} is neither int32 nor int64", b.field,
         static_cast<int>(buf.type));
  }
  if (buf.data == nullptr) {
    fail(errc::invalid_argument, "buffers.{}: the pointer is null (leave the field empty for eplb's own buffer)",
         b.field);
  }
  const auto size = element_size(buf.type);
  if (reinterpret_cast<std::uintptr_t>(buf.data) % size != 0) {
    fail(errc::invalid_argument, "buffers.{}: not aligned to its {}-byte {} elements (address {})", b.field, size,
         buf.type == element_type::int32 ? "int32" : "int64", buf.data);
  }
  if (!dev.is_device_memory(buf.data)) {
    fail(errc::invalid_argument,
         "buffers.{}: not device memory of {} device {} (address {}; allocate it there, e.g. with cudaMalloc on "
         "that GPU)",
         b.field, device::to_string(dev.kind()), dev.ordinal(), buf.data);
  }
}

}  // namespace

void check_engine_buffers(const state_params& p) {
  const auto& shape = p.model.shape;
  const auto layers = static_cast<std::size_t>(shape.layers);
  const auto slots = static_cast<std::size_t>(shape.num_physical);
  const auto experts = static_cast<std::size_t>(shape.num_logical);
  const auto width = static_cast<std::size_t>(shape.num_physical - shape.num_logical + 1);
  const std::array<named_buffer, 4> all{{{"load", &p.buffers.load, layers * slots},
                                         {"phy2log", &p.buffers.phy2log, layers * slots},
                                         {"log2phy", &p.buffers.log2phy, layers * experts * width},
                                         {"replica_count", &p.buffers.replica_count, layers * experts}}};
  for (const auto& b : all) {
    if (b.buffer->has_value()) check_one(b, *p.dev);
  }
  // eplb writes the maps and reads the load: two of them sharing bytes would corrupt each other.
  for (std::size_t i = 0; i < all.size(); ++i) {
    for (std::size_t j = i + 1; j < all.size(); ++j) {
      if (!all[i].buffer->has_value() || !all[j].buffer->has_value()) continue;
      const auto& a = **all[i].buffer;
      const auto& b = **all[j].buffer;
      const auto a0 = reinterpret_cast<std::uintptr_t>(a.data);
      const auto b0 = reinterpret_cast<std::uintptr_t>(b.data);
      if (a0 < b0 + all[j].elements * element_size(b.type) && b0 < a0 + all[i].elements * element_size(a.type)) {
        fail(errc::invalid_argument, "buffers.{}: overlaps buffers.{} (each needs its own memory)", all[j].field,
             all[i].field);
      }
    }
  }
}

void store_elements(void* dst, element_type type, std::span<const std::int32_t> values) noexcept {
  if (type == element_type::int32) {
    std::memcpy(dst, values.data(), values.size_bytes());
    return;
  }
  auto* out = static_cast<std::int64_t*>(dst);
  std::copy(values.begin(), values.end(), out);
}

void add_increase(std::span<std::int64_t> out, const void* later, const void* earlier, element_type type) noexcept {
  if (type == element_type::int32) {
    const auto* a = static_cast<const std::uint32_t*>(later);
    const auto* b = static_cast<const std::uint32_t*>(earlier);
    for (std::size_t i = 0; i < out.size(); ++i)
      out[i] += static_cast<std::int64_t>(static_cast<std::uint32_t>(a[i] - b[i]));
    return;
  }
  const auto* a = static_cast<const std::uint64_t*>(later);
  const auto* b = static_cast<const std::uint64_t*>(earlier);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] += static_cast<std::int64_t>(a[i] - b[i]);
}

}  // namespace eplb::state_detail

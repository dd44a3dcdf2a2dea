// Engines' own buffers (state_params::buffers): their checks, and the typed reads and writes that
// the load recorder and the device maps share (int32 or int64 elements, chosen per buffer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

#include "eplb/state.hpp"

namespace eplb::state_detail {

[[nodiscard]] constexpr std::size_t element_size(element_type t) noexcept {
  return t == element_type::int32 ? 4 : 8;
}

/// Refuses a null, misaligned or overlapping buffer, an unknown element type, and memory that the
/// device cannot use as device memory: error(errc::invalid_argument) naming the field.
void check_engine_buffers(const state_params& p);

/// Writes `values` as `type` elements at `dst`.
void store_elements(void* dst, element_type type, std::span<const std::int32_t> values) noexcept;

/// out[i] += later[i] - earlier[i] for `type` elements, taken modulo 2^32 or 2^64: a counter that
/// wrapped between the two readings still gives its increase.
void add_increase(std::span<std::int64_t> out, const void* later, const void* earlier, element_type type) noexcept;

}  // namespace eplb::state_detail

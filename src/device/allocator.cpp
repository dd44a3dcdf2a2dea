// Where a device's memory comes from: the backend's allocator, or an engine's allocator hook
// (device::set_allocator) so that the engine accounts eplb's staging, packing and communicator
// memory in its own allocator. Either way a buffer goes back where it came from, and only once no
// queued work may touch it (device::release_after).
#include <fmt/format.h>

#include "eplb/device/device.hpp"
#include "util/fail.hpp"

namespace eplb::device {

std::string_view to_string(memory_kind kind) noexcept {
  switch (kind) {
    case memory_kind::host:
      return "host";
    case memory_kind::pinned:
      return "pinned";
    case memory_kind::device:
      return "device";
  }
  return "unknown";
}

namespace detail {

void free_through(const allocator_hook& hook, std::byte* data, std::size_t size, memory_kind kind) noexcept {
  try {
    hook.free(data, size, kind);
  } catch (...) {  // NOLINT(bugprone-empty-catch): documented as not throwing; a destructor cannot report it
  }
}

}  // namespace detail

void device::set_allocator(allocator_hook hook) {
  const bool alloc = static_cast<bool>(hook.allocate), free = static_cast<bool>(hook.free);
  if (alloc != free) {
    fail(errc::invalid_argument,
         "set_allocator: allocate and free must both be set or both be empty (allocate {}, "
         "free {})",
         alloc ? "set" : "empty", free ? "set" : "empty");
  }
  hook_.store(alloc ? std::make_shared<const allocator_hook>(std::move(hook)) : nullptr);
}

buffer device::allocate(std::size_t bytes, memory_kind kind) {
  (void)collect_released();
  auto hook = hook_.load();
  if (!hook) return allocate_memory(bytes, kind);
  void* p = hook->allocate(bytes, kind);
  if (p == nullptr) {
    fail(errc::out_of_memory, "allocator hook: returned no memory for {} bytes of {} memory", bytes, to_string(kind));
  }
  return buffer(static_cast<std::byte*>(p), bytes, kind, std::move(hook));
}

buffer device::allocate_direct(std::size_t bytes, memory_kind kind) {
  (void)collect_released();
  return allocate_memory(bytes, kind);
}

}  // namespace eplb::device

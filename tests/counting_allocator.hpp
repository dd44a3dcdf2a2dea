// An engine's allocator stand-in for allocator-hook tests: every live block is remembered, so that a
// free of something it did not give (or with another size or kind) is caught, and allocations are
// counted. Where the memory comes from is the test's (host memory, or the CUDA runtime's).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "eplb/device/device.hpp"

namespace eplb::testing {

struct counting_allocator {
  using raw_allocate = std::function<void*(std::size_t bytes, device::memory_kind kind)>;
  using raw_free = std::function<void(void* p, device::memory_kind kind)>;

  std::mutex mutex;
  std::map<void*, std::pair<std::size_t, device::memory_kind>> live;
  std::int64_t allocations = 0, frees = 0, bad_frees = 0;
  std::size_t fail_from = SIZE_MAX;  // allocations past this many return null

  // The hook an engine would install; the raw functions get at least one byte.
  static device::allocator_hook hook(const std::shared_ptr<counting_allocator>& self, raw_allocate get, raw_free put) {
    return {[self, get](std::size_t bytes, device::memory_kind kind) -> void* {
              std::lock_guard lock(self->mutex);
              if (static_cast<std::size_t>(self->allocations) >= self->fail_from) return nullptr;
              void* p = get(std::max<std::size_t>(bytes, 1), kind);
              if (p == nullptr) return nullptr;
              self->live[p] = {bytes, kind};
              ++self->allocations;
              return p;
            },
            [self, put](void* p, std::size_t bytes, device::memory_kind kind) {
              {
                std::lock_guard lock(self->mutex);
                const auto it = self->live.find(p);
                if (it == self->live.end() || it->second != std::make_pair(bytes, kind)) {
                  ++self->bad_frees;
                  return;
                }
                self->live.erase(it);
                ++self->frees;
              }
              put(p, kind);
            }};
  }

  // Aligned host memory whatever the kind (the host device's memory).
  static void* host_allocate(std::size_t bytes, device::memory_kind /*kind*/) {
    return std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  }
  static void host_free(void* p, device::memory_kind /*kind*/) { std::free(p); }

  std::int64_t count() {
    std::lock_guard lock(mutex);
    return allocations;
  }
};

}  // namespace eplb::testing

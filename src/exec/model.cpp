// The model's shape checks and the checksum that verification uses.
#include <cstring>

#include "eplb/exec/rearrange.hpp"
#include "util/fail.hpp"

namespace eplb::exec {

std::size_t model_shape::expert_bytes() const {
  std::size_t n = 0;
  for (const auto& t : bundle) n += t.bytes_per_expert;
  return n;
}

void model_shape::validate() const {
  if (layers <= 0) fail(errc::invalid_argument, "model.layers: must be > 0, got {}", layers);
  if (num_logical <= 0) fail(errc::invalid_argument, "model.num_logical: must be > 0, got {}", num_logical);
  if (num_ranks <= 0) fail(errc::invalid_argument, "model.num_ranks: must be > 0, got {}", num_ranks);
  if (num_physical < num_logical || num_physical % num_ranks != 0) {
    fail(errc::invalid_argument, "model.num_physical: {} must be >= {} experts and divisible by {} ranks", num_physical,
         num_logical, num_ranks);
  }
  if (ranks_per_node < 0) fail(errc::invalid_argument, "model.ranks_per_node: must be >= 0, got {}", ranks_per_node);
  if (bundle.empty()) fail(errc::invalid_argument, "model.bundle: needs at least one tensor");
  for (std::size_t t = 0; t < bundle.size(); ++t) {
    if (bundle[t].bytes_per_expert == 0)
      fail(errc::invalid_argument, "model.bundle[{}] ({}): bytes_per_expert must be > 0", t, bundle[t].name);
    if (bundle[t].stride < bundle[t].bytes_per_expert) {
      fail(errc::invalid_argument, "model.bundle[{}] ({}): stride {} is smaller than bytes_per_expert {}", t,
           bundle[t].name, bundle[t].stride, bundle[t].bytes_per_expert);
    }
  }
}

std::uint64_t checksum(std::span<const std::byte> bytes) noexcept {
  // FNV-1a over 8-byte words (then the tail), with a final avalanche: fast enough to check weights.
  std::uint64_t h = 0xcbf29ce484222325ULL ^ bytes.size();
  std::size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    h = (h ^ w) * 0x100000001b3ULL;
  }
  for (; i < bytes.size(); ++i) h = (h ^ static_cast<std::uint64_t>(bytes[i])) * 0x100000001b3ULL;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h;
}

}  // namespace eplb::exec

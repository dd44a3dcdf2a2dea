// The communicator conformance check, shared by the in-process (loopback) tests and the per-process
// rank driver (gloo, nccl): every rank derives the same random batch from a seed, sends bytes whose
// value encodes (round, sender, receiver, message, offset), and verifies every byte it receives.
#pragma once

#include <cstdint>
#include <string>

#include "eplb/comm/communicator.hpp"
#include "eplb/device/device.hpp"

namespace eplb::testing {

struct conformance_config {
  std::uint64_t seed = 1;
  int rounds = 3;
  std::size_t chunk_bytes = 4096;  ///< sizes are drawn around multiples of this
  int max_messages_per_pair = 5;
};

/// Runs `rounds` random batches on `comm` with buffers of `dev` (device memory when `staged`, then
/// the stream `s` orders the copies). Returns an empty string on success, else the first mismatch.
std::string run_conformance(comm::communicator& comm, device::device& dev, device::stream* s,
                            const conformance_config& cfg);

/// The byte at `offset` of message `index` from `src` to `dst` in `round`.
inline std::byte pattern_byte(int round, int src, int dst, int index, std::size_t offset) {
  std::uint64_t x = (static_cast<std::uint64_t>(round) << 48) ^ (static_cast<std::uint64_t>(src) << 40) ^
                    (static_cast<std::uint64_t>(dst) << 32) ^ (static_cast<std::uint64_t>(index) << 24) ^ offset;
  x ^= x >> 29;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 32;
  return static_cast<std::byte>(x & 0xff);
}

}  // namespace eplb::testing

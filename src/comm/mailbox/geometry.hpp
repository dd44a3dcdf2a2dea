// How a mailbox is cut. Each ordered pair (sender, receiver) owns a region of one rank's mailbox
// (the receiver's in push mode, the sender's in pull mode), cut into slots of at most chunk_bytes:
// 2..64 of them, since a deep queue keeps the copy engine busy while hand-offs travel. A rank's
// mailbox holds one region per peer, indexed by the peer's rank, skipping its own.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "eplb/comm/communicator.hpp"
#include "util/fail.hpp"

namespace eplb::comm {

struct mailbox_geometry {
  static constexpr std::size_t max_slots = 64;         // chunks of one pair in flight, at most
  static constexpr std::size_t min_slot_bytes = 4096;  // below this, host hand-offs would dominate
  static constexpr std::size_t slot_align = 256;

  std::size_t peers = 1;
  std::size_t region_bytes = 0;  // of one pair
  std::size_t slots = 2;         // per region
  std::size_t slot_bytes = 0;

  /// Cuts staging_bytes (one rank's mailbox) for `size` ranks; error(errc::invalid_argument),
  /// naming `who`, when a slot would be smaller than min_slot_bytes.
  static mailbox_geometry of(const options& o, int size, std::string_view who) {
    mailbox_geometry g;
    g.peers = static_cast<std::size_t>(std::max(1, size - 1));
    g.region_bytes = o.staging_bytes / g.peers / slot_align * slot_align;
    g.slots = std::clamp<std::size_t>(g.region_bytes / std::max<std::size_t>(o.chunk_bytes, 1), 2, max_slots);
    g.slot_bytes = g.region_bytes / g.slots / slot_align * slot_align;
    if (g.slot_bytes < min_slot_bytes) {
      fail(errc::invalid_argument,
           "{}: staging_bytes {} leaves {} bytes per slot ({} peers x {} slots); at least {} are needed", who,
           o.staging_bytes, g.slot_bytes, g.peers, g.slots, min_slot_bytes);
    }
    return g;
  }

  [[nodiscard]] std::size_t mailbox_bytes() const noexcept { return region_bytes * peers; }

  /// Where chunk `chunk` of the pair between `owner` (whose mailbox holds the region) and `other`
  /// lies, from the start of the owner's mailbox.
  [[nodiscard]] std::size_t offset(int owner, int other, std::uint64_t chunk) const noexcept {
    const auto index = static_cast<std::size_t>(other < owner ? other : other - 1);
    return index * region_bytes + static_cast<std::size_t>(chunk % slots) * slot_bytes;
  }
  /// Chunks a byte stream of `bytes` needs.
  [[nodiscard]] std::uint64_t chunks(std::size_t bytes) const noexcept { return (bytes + slot_bytes - 1) / slot_bytes; }
};

}  // namespace eplb::comm

// The small shared-memory block beside the mailboxes: per ordered pair of ranks the hand-off
// counters and the current manifest, per rank a failure flag with its reason. Rank 0 creates it
// under a random name published in the store; the others map it. Counters only ever grow, and a
// writer publishes one (release) only after the copy it counts has completed, so a reader that
// sees it (acquire) may touch the slot.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "comm/mailbox/shared_memory.hpp"
#include "eplb/comm/store.hpp"

namespace eplb::comm {

// One cache line per counter block so the two writers of a pair never share a line.
struct alignas(64) pair_control {
  std::atomic<std::uint64_t> manifest_posted;      // by the sender: manifests written so far
  std::atomic<std::uint64_t> manifest_read;        // by the receiver: manifests it has checked
  std::atomic<std::uint64_t> count;                // the current manifest: messages,
  std::atomic<std::uint64_t> total;                // their bytes,
  std::atomic<std::uint64_t> hash;                 // and a hash of their sizes in order
  std::atomic<std::uint64_t> filled;               // by the sender: chunks placed in the slots
  alignas(64) std::atomic<std::uint64_t> drained;  // by the receiver: chunks copied out
};

class control_block {
 public:
  /// Rank 0 creates the block and publishes its name; the others wait for the name (at most
  /// `timeout`) and map it. Errors name `who`; a block rank 0 could not share is errc::invalid_config.
  control_block(store& s, int rank, int size, milliseconds timeout, std::string_view who);

  [[nodiscard]] pair_control& pair(int sender, int receiver) const;
  /// Marks `rank` failed with `why` (cut to fit), for its peers to report.
  void publish_failure(int rank, std::string_view why) const noexcept;
  /// Why `rank` failed, if it has.
  [[nodiscard]] std::optional<std::string> failure(int rank) const;
  /// Removes the name once every rank has mapped the block (rank 0 only; a no-op elsewhere).
  void unlink() noexcept { map_.unlink(); }

 private:
  struct rank_control;
  [[nodiscard]] rank_control& of(int rank) const;

  shm_mapping map_;
  int size_;
};

}  // namespace eplb::comm

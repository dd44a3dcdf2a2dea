// Where the mailboxes live and how a rank reaches its peers': the one thing that differs between
// cuda_ipc (device memory, shared by CUDA IPC handles) and gloo's shared-memory transport (pinned
// host memory in POSIX shared memory, src/comm/gloo_shared_memory.cpp). The mailbox transport
// (mailbox_transport.hpp) does the rest for both.
#pragma once

#include <cstddef>
#include <string>

#include "eplb/comm/communicator.hpp"

namespace eplb::comm {

class mailbox_memory {
 public:
  virtual ~mailbox_memory() = default;

  /// What the user asked for, for errors ("cuda_ipc", "gloo (shared memory)").
  [[nodiscard]] virtual const char* name() const noexcept = 0;
  [[nodiscard]] virtual backend kind() const noexcept = 0;
  /// "device" or "host": part of the mailbox layout every rank must share.
  [[nodiscard]] virtual const char* where() const noexcept = 0;

  /// Allocates this rank's mailbox (only when there are peers).
  virtual void allocate(std::size_t bytes) = 0;
  /// What a peer needs to map this rank's mailbox; published in this rank's record.
  [[nodiscard]] virtual std::string handle() const = 0;
  /// Maps the mailbox of rank `owner` (on device `ordinal`) from its `handle`.
  virtual void map_peer(int owner, const std::string& handle, int ordinal) = 0;
  /// Every rank has mapped every mailbox: names used to find them may go.
  virtual void all_mapped() noexcept {}

  [[nodiscard]] virtual std::byte* own() const noexcept = 0;
  [[nodiscard]] virtual std::byte* peer(int owner) const noexcept = 0;

  /// A copy of ours may still touch this rank's mailbox: it must never be freed.
  virtual void keep_for_good() noexcept {}
};

}  // namespace eplb::comm

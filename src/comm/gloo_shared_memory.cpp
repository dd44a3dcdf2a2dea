// gloo's shared-memory transport, between processes of one host with a CUDA device each (chosen
// in gloo_transport.cpp): each rank's mailbox is a POSIX shared-memory segment that every rank
// maps and pins, so the sender's copy engine writes D2H into the receiver's mailbox and the
// receiver's copies it out H2D: no socket, no CPU copy. The mailbox transport (src/comm/mailbox/)
// does the rest, as for cuda_ipc; this file says where the mailboxes live.
#include <fmt/format.h>

#include <cerrno>
#include <cstring>

#include "comm/backends.hpp"
#include "comm/mailbox/mailbox_transport.hpp"
#include "comm/mailbox/shared_memory.hpp"
#include "device/cuda_handles.hpp"
#include "util/fail.hpp"

namespace eplb::comm {
namespace {

// A shared-memory mapping pinned for the copy engines; unpinned before it is unmapped.
struct pinned_mapping {
  shm_mapping map;
  device::cuda::host_registration pin;
};

class host_mailbox final : public mailbox_memory {
 public:
  explicit host_mailbox(int rank) : rank_(rank) {}

  const char* name() const noexcept override { return "gloo (shared memory)"; }
  backend kind() const noexcept override { return backend::gloo; }
  const char* where() const noexcept override { return "host"; }

  void allocate(std::size_t bytes) override {
    bytes_ = bytes;
    auto map = shm_mapping::create(shm_mapping::unique_name("/eplb-box"), bytes, shm_mapping::sizing::reserve, name());
    own_ = pin(std::move(map), -1);
  }

  std::string handle() const override { return own_.map.name(); }

  void map_peer(int owner, const std::string& handle, int) override {
    auto map = shm_mapping::open(handle, bytes_, name());
    if (!map) {
      fail(errc::invalid_config, "{} rank {}: cannot open the mailbox {} of rank {} ({}): ranks must share a host",
           name(), rank_, handle, owner, std::strerror(errno));
    }
    if (peers_.size() <= static_cast<std::size_t>(owner)) peers_.resize(static_cast<std::size_t>(owner) + 1);
    peers_[static_cast<std::size_t>(owner)] = pin(std::move(*map), owner);
  }

  void all_mapped() noexcept override { own_.map.unlink(); }

  std::byte* own() const noexcept override { return own_.map.data(); }
  std::byte* peer(int owner) const noexcept override {
    const auto r = static_cast<std::size_t>(owner);
    return r < peers_.size() ? peers_[r].map.data() : nullptr;
  }

 private:
  // Pins `map` (the mailbox of `owner`, or this rank's when -1) for the copy engines.
  pinned_mapping pin(shm_mapping map, int owner) const {
    device::cuda::host_registration reg(map.data(), bytes_);
    if (reg.status() != cudaSuccess) {
      fail(errc::backend_unavailable, "{} rank {}: cannot pin the mailbox {}{} ({} bytes): {}", name(), rank_,
           map.name(), owner < 0 ? std::string() : fmt::format(" of rank {}", owner), bytes_,
           cudaGetErrorString(reg.status()));
    }
    return {std::move(map), std::move(reg)};
  }

  int rank_;
  std::size_t bytes_ = 0;
  pinned_mapping own_;
  std::vector<pinned_mapping> peers_;  // by rank; declared last: unmapped first
};

}  // namespace

std::unique_ptr<transport> make_shared_memory_gloo(const setup& s) {
  return make_mailbox_transport(s, std::make_unique<host_mailbox>(s.rank));
}

}  // namespace eplb::comm

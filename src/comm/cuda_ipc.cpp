// cuda_ipc: ranks are processes on one node, one GPU each. Every rank allocates one device mailbox
// at start and shares its CUDA IPC handle through the store; a transfer is a cudaMemcpyAsync
// between two GPUs' memory, on copy engines over NVLink. The mailbox transport
// (src/comm/mailbox/) does the rest; this file says where the mailboxes live.
#include <cuda_runtime_api.h>

#include <fmt/format.h>

#include <cstdio>

#include "comm/backends.hpp"
#include "comm/mailbox/mailbox_transport.hpp"
#include "device/cuda_handles.hpp"
#include "util/fail.hpp"

namespace eplb::comm {
namespace {

std::string hex(const void* data, std::size_t n) {
  std::string out;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) out += fmt::format("{:02x}", p[i]);
  return out;
}

bool unhex(const std::string& s, void* data, std::size_t n) {
  if (s.size() != 2 * n) return false;
  auto* p = static_cast<unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    unsigned v = 0;
    if (std::sscanf(s.c_str() + 2 * i, "%2x", &v) != 1) return false;
    p[i] = static_cast<unsigned char>(v);
  }
  return true;
}

// This rank's mailbox in its device memory; peers' mapped through their IPC handles.
class device_mailbox final : public mailbox_memory {
 public:
  device_mailbox(device::device* dev, int rank) : dev_(dev), rank_(rank) {}

  const char* name() const noexcept override { return "cuda_ipc"; }
  backend kind() const noexcept override { return backend::cuda_ipc; }
  const char* where() const noexcept override { return "device"; }

  // Its own cudaMalloc allocation, never an engine allocator's: CUDA IPC shares whole allocations.
  void allocate(std::size_t bytes) override { own_ = dev_->allocate_direct(bytes, device::memory_kind::device); }

  std::string handle() const override {
    cudaIpcMemHandle_t h{};
    if (own_.data() != nullptr) device::cuda::check(cudaIpcGetMemHandle(&h, own_.data()), "cudaIpcGetMemHandle");
    return hex(&h, sizeof h);
  }

  void map_peer(int owner, const std::string& handle, int ordinal) override {
    cudaIpcMemHandle_t h{};
    if (!unhex(handle, &h, sizeof h))
      fail(errc::transport, "{}: rank {} published a malformed IPC handle", name(), owner);
    device::cuda::ipc_mapping m(h);
    if (m.status() != cudaSuccess) {
      fail(errc::backend_unavailable, "{} rank {}: cannot map the mailbox of rank {} (GPU {}): {}", name(), rank_,
           owner, ordinal, cudaGetErrorString(m.status()));
    }
    if (peers_.size() <= static_cast<std::size_t>(owner)) peers_.resize(static_cast<std::size_t>(owner) + 1);
    peers_[static_cast<std::size_t>(owner)] = std::move(m);
  }

  std::byte* own() const noexcept override { return own_.data(); }
  std::byte* peer(int owner) const noexcept override {
    const auto r = static_cast<std::size_t>(owner);
    return r < peers_.size() ? peers_[r].data() : nullptr;
  }
  void keep_for_good() noexcept override { device::keep_for_good(std::move(own_)); }

 private:
  device::device* dev_;
  int rank_;
  device::buffer own_;
  std::vector<device::cuda::ipc_mapping> peers_;  // by rank; declared last: closed first
};

}  // namespace

std::unique_ptr<transport> make_cuda_ipc(const setup& s) {
  return make_mailbox_transport(s, std::make_unique<device_mailbox>(s.dev, s.rank));
}

}  // namespace eplb::comm

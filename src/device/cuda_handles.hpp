// Owning CUDA handles for code that drives copies itself (the mailbox transports in src/comm):
// each is move-only and gives its handle back in a destructor that never throws; an error there is
// cleared, so it cannot leak into an unrelated later call.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "device/cuda_check.hpp"

namespace eplb::device::cuda {

/// A stream that does not wait for the legacy default stream.
class stream_handle {
 public:
  stream_handle() { check(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
  ~stream_handle() {
    if (s_ != nullptr && cudaStreamDestroy(s_) != cudaSuccess) (void)cudaGetLastError();
  }
  stream_handle(stream_handle&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  stream_handle& operator=(stream_handle&&) = delete;
  stream_handle(const stream_handle&) = delete;
  stream_handle& operator=(const stream_handle&) = delete;

  [[nodiscard]] cudaStream_t get() const noexcept { return s_; }
  /// Whether work is still queued or running on it (a failed query counts as not busy).
  [[nodiscard]] bool busy() const noexcept { return cudaStreamQuery(s_) == cudaErrorNotReady; }

 private:
  cudaStream_t s_ = nullptr;
};

/// An event without timing, for ordering and completion queries.
class event_handle {
 public:
  event_handle() { check(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming), "cudaEventCreateWithFlags"); }
  ~event_handle() {
    if (e_ != nullptr && cudaEventDestroy(e_) != cudaSuccess) (void)cudaGetLastError();
  }
  event_handle(event_handle&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  event_handle& operator=(event_handle&&) = delete;
  event_handle(const event_handle&) = delete;
  event_handle& operator=(const event_handle&) = delete;

  [[nodiscard]] cudaEvent_t get() const noexcept { return e_; }
  void record(cudaStream_t s) { check(cudaEventRecord(e_, s), "cudaEventRecord"); }
  /// Whether the work before the last record() has finished; errc::device when the query fails.
  [[nodiscard]] bool done() const {
    const auto st = cudaEventQuery(e_);
    if (st == cudaSuccess) return true;
    if (st == cudaErrorNotReady) return false;
    check(st, "cudaEventQuery");
    return false;
  }

 private:
  cudaEvent_t e_ = nullptr;
};

/// Makes work queued on `waiter` from now on wait for everything queued so far on `streams` (on
/// the GPU: the host never waits). For copies that outlived a bounded wait: a caller that frees its
/// buffers after an event recorded on `waiter` then frees them only once those copies have ended.
/// A null `waiter` is the legacy default stream. False when CUDA refused a call (the error is
/// cleared), and then nothing is known about the ordering.
template <typename Streams>
[[nodiscard]] bool order_after(cudaStream_t waiter, const Streams& streams) noexcept {
  if (waiter == nullptr) waiter = cudaStreamLegacy;
  bool ok = true;
  for (const auto& s : streams) {
    cudaEvent_t e = nullptr;
    if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess) {
      ok = false;
      continue;
    }
    // Destroying a recorded event is allowed: the wait already captured the point it marks.
    ok &= cudaEventRecord(e, s.get()) == cudaSuccess && cudaStreamWaitEvent(waiter, e, 0) == cudaSuccess;
    ok &= cudaEventDestroy(e) == cudaSuccess;
  }
  if (!ok) (void)cudaGetLastError();
  return ok;
}

/// Host memory registered (pinned) for the copy engines, e.g. a shared-memory mapping; empty when
/// registration failed (status() says why).
class host_registration {
 public:
  host_registration() = default;
  host_registration(void* p, std::size_t bytes) noexcept
      : status_(cudaHostRegister(p, bytes, cudaHostRegisterPortable)) {
    if (status_ == cudaSuccess) {
      p_ = p;
    } else {
      (void)cudaGetLastError();
    }
  }
  ~host_registration() {
    if (p_ != nullptr && cudaHostUnregister(p_) != cudaSuccess) (void)cudaGetLastError();
  }
  host_registration(host_registration&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), status_(std::exchange(o.status_, cudaSuccess)) {}
  host_registration& operator=(host_registration&& o) noexcept {
    host_registration(std::move(o)).swap(*this);
    return *this;
  }
  host_registration(const host_registration&) = delete;
  host_registration& operator=(const host_registration&) = delete;

  [[nodiscard]] cudaError_t status() const noexcept { return status_; }

 private:
  void swap(host_registration& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(status_, o.status_);
  }
  void* p_ = nullptr;
  cudaError_t status_ = cudaSuccess;
};

/// Another process's device memory mapped through its CUDA IPC handle; empty when the mapping
/// failed (status() says why).
class ipc_mapping {
 public:
  ipc_mapping() = default;
  explicit ipc_mapping(const cudaIpcMemHandle_t& h) noexcept
      : status_(cudaIpcOpenMemHandle(&p_, h, cudaIpcMemLazyEnablePeerAccess)) {
    if (status_ != cudaSuccess) {
      p_ = nullptr;
      (void)cudaGetLastError();
    }
  }
  ~ipc_mapping() {
    if (p_ != nullptr && cudaIpcCloseMemHandle(p_) != cudaSuccess) (void)cudaGetLastError();
  }
  ipc_mapping(ipc_mapping&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), status_(std::exchange(o.status_, cudaSuccess)) {}
  ipc_mapping& operator=(ipc_mapping&& o) noexcept {
    ipc_mapping(std::move(o)).swap(*this);
    return *this;
  }
  ipc_mapping(const ipc_mapping&) = delete;
  ipc_mapping& operator=(const ipc_mapping&) = delete;

  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(p_); }
  [[nodiscard]] cudaError_t status() const noexcept { return status_; }

 private:
  void swap(ipc_mapping& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(status_, o.status_);
  }
  void* p_ = nullptr;
  cudaError_t status_ = cudaSuccess;
};

}  // namespace eplb::device::cuda

// The CUDA backend. Events complete on the host through cudaLaunchHostFunc, whose callback only
// flips host state and runs eplb callbacks that must only post (CUDA forbids CUDA calls there);
// query and wait also ask the driver, which knows about failures the host callback never sees.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>

#include "device/cuda_check.hpp"
#include "device/event_state.hpp"

namespace eplb::device {
namespace {

using cuda::check;
using cuda::use_device;

class cuda_event_state final : public detail::event_state {
 public:
  cuda_event_state(int ordinal, cudaEvent_t e, bool owned = true) : ordinal_(ordinal), event_(e), owned_(owned) {}
  ~cuda_event_state() override {
    if (owned_) (void)cudaEventDestroy(event_);
  }

  cudaEvent_t native() const noexcept { return event_; }

  bool poll() override {
    if (done()) return true;
    use_device(ordinal_);
    const cudaError_t status = cudaEventQuery(event_);
    if (status == cudaErrorNotReady) return false;
    if (status == cudaSuccess) {
      complete(nullptr);
    } else {
      (void)cudaGetLastError();
      complete(std::make_exception_ptr(
          error(errc::device, fmt::format("CUDA work before the event failed: {}", cudaGetErrorString(status)))));
    }
    return true;
  }

  static void CUDART_CB on_host(void* raw) {
    // Runs on a CUDA driver thread: no CUDA calls here.
    auto* holder = static_cast<std::shared_ptr<cuda_event_state>*>(raw);
    (*holder)->complete(nullptr);
    delete holder;
  }

 private:
  int ordinal_;
  cudaEvent_t event_;
  bool owned_;  // false: the engine's event (device::wrap_event)
};

class cuda_stream final : public stream {
 public:
  explicit cuda_stream(int ordinal) : ordinal_(ordinal) {
    use_device(ordinal_);
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  }
  // The engine's stream (device::wrap_stream): used, never destroyed.
  cuda_stream(int ordinal, cudaStream_t borrowed) : ordinal_(ordinal), stream_(borrowed), owned_(false) {}
  ~cuda_stream() override {
    if (!owned_) return;
    // Destroying a stream with pending work is allowed: the driver finishes it and then releases it.
    (void)cudaSetDevice(ordinal_);
    (void)cudaStreamDestroy(stream_);
  }
  void copy(void* dst, const void* src, std::size_t bytes) override {
    if (bytes == 0) return;
    use_device(ordinal_);
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
  }
  void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
               std::size_t height) override {
    if (width == 0 || height == 0) return;
    use_device(ordinal_);
    check(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, cudaMemcpyDefault, stream_),
          "cudaMemcpy2DAsync");
  }
  void fill(void* dst, std::byte value, std::size_t bytes) override {
    if (bytes == 0) return;
    use_device(ordinal_);
    check(cudaMemsetAsync(dst, static_cast<int>(value), bytes, stream_), "cudaMemsetAsync");
  }
  event record() override {
    use_device(ordinal_);
    cudaEvent_t e = nullptr;
    check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    auto state = std::make_shared<cuda_event_state>(ordinal_, e);
    check(cudaEventRecord(e, stream_), "cudaEventRecord");
    auto* holder = new std::shared_ptr<cuda_event_state>(state);
    if (const cudaError_t status = cudaLaunchHostFunc(stream_, &cuda_event_state::on_host, holder);
        status != cudaSuccess) {
      delete holder;
      check(status, "cudaLaunchHostFunc");
    }
    return event(state);
  }
  void wait(const event& e) override {
    auto* state = dynamic_cast<cuda_event_state*>(e.state());
    if (state == nullptr) fail(errc::invalid_argument, "cuda stream: can only wait on CUDA events");
    use_device(ordinal_);
    check(cudaStreamWaitEvent(stream_, state->native(), 0), "cudaStreamWaitEvent");
  }
  void* native_handle() const noexcept override { return stream_; }

 private:
  int ordinal_;
  cudaStream_t stream_ = nullptr;
  bool owned_ = true;
};

void free_device(std::byte* p, int ordinal) noexcept {
  (void)cudaSetDevice(ordinal);
  (void)cudaFree(p);
}
void free_pinned(std::byte* p, int) noexcept {
  (void)cudaFreeHost(p);
}
void free_plain(std::byte* p, int) noexcept {
  std::free(p);
}

class cuda_device final : public device {
 public:
  explicit cuda_device(int ordinal) : ordinal_(ordinal) { use_device(ordinal_); }
  backend_kind kind() const noexcept override { return backend_kind::cuda; }
  int ordinal() const noexcept override { return ordinal_; }
  std::unique_ptr<stream> create_stream() override { return std::make_unique<cuda_stream>(ordinal_); }
  std::unique_ptr<stream> wrap_stream(void* native) override {
    if (native == nullptr) fail(errc::invalid_argument, "wrap_stream: the native stream is null");
    return std::make_unique<cuda_stream>(ordinal_, static_cast<cudaStream_t>(native));
  }
  event wrap_event(void* native) override {
    if (native == nullptr) fail(errc::invalid_argument, "wrap_event: the native event is null");
    return event(std::make_shared<cuda_event_state>(ordinal_, static_cast<cudaEvent_t>(native), false));
  }

 protected:
  buffer allocate_memory(std::size_t bytes, memory_kind kind) override {
    use_device(ordinal_);
    void* p = nullptr;
    const std::size_t n = std::max<std::size_t>(bytes, 1);
    switch (kind) {
      case memory_kind::device:
        check(cudaMalloc(&p, n), "cudaMalloc");
        return buffer(static_cast<std::byte*>(p), bytes, kind, ordinal_, &free_device);
      case memory_kind::pinned:
        check(cudaHostAlloc(&p, n, cudaHostAllocPortable), "cudaHostAlloc");
        return buffer(static_cast<std::byte*>(p), bytes, kind, ordinal_, &free_pinned);
      case memory_kind::host:
        p = std::aligned_alloc(256, (n + 255) / 256 * 256);
        if (p == nullptr) fail(errc::device, "cannot allocate {} host bytes", bytes);
        return buffer(static_cast<std::byte*>(p), bytes, kind, ordinal_, &free_plain);
    }
    fail(errc::internal, "cuda device: unknown memory kind");
  }

 private:
  int ordinal_;
};

}  // namespace

namespace cuda {
std::unique_ptr<device> make_device(int ordinal) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 0;
  }
  if (ordinal < 0 || ordinal >= count) {
    fail(errc::backend_unavailable, "cuda device {}: this machine has {} usable GPU(s)", ordinal, count);
  }
  return std::make_unique<cuda_device>(ordinal);
}

void versions(int& driver, int& runtime) noexcept {
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  (void)cudaGetLastError();
}

int device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}
}  // namespace cuda

}  // namespace eplb::device

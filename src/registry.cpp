// The one place that knows which backends were compiled in. Everywhere else a backend is a run-time
// value, and asking for one that is absent is errc::backend_unavailable.
#include <fmt/format.h>

#include "comm/backends.hpp"
#include "eplb/device/device.hpp"
#include "eplb_build_config.hpp"
#include "util/fail.hpp"

#if EPLB_HAVE_CUDA
namespace eplb::device::cuda {
std::unique_ptr<device> make_device(int ordinal);
int device_count() noexcept;
}  // namespace eplb::device::cuda
#endif

namespace eplb {

std::unique_ptr<device::device> device::make_cuda_device(int ordinal) {
#if EPLB_HAVE_CUDA
  return cuda::make_device(ordinal);
#else
  (void)ordinal;
  fail(errc::backend_unavailable, "device cuda: eplb was built without CUDA (nvcc was not found at configure time)");
#endif
}

int device::cuda_device_count() noexcept {
#if EPLB_HAVE_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

namespace comm {
namespace {

// Why the GPU backends (nccl, stateless_nccl, cuda_ipc) cannot run here, or empty when they can.
[[maybe_unused]] std::string gpu_unavailable_reason() {
  return device::cuda_device_count() > 0 ? std::string() : std::string("no usable GPU on this machine");
}

// The transport of backend `b`; error(errc::backend_unavailable) when it was not built or cannot run.
std::unique_ptr<transport> make_transport(backend b, const setup& s) {
  switch (b) {
    case backend::loopback:
      return make_loopback(s);
    case backend::gloo:
#if EPLB_HAVE_GLOO
#if EPLB_HAVE_CUDA
      if (gloo_over_shared_memory(s)) return make_shared_memory_gloo(s);
#else
      (void)gloo_over_shared_memory(s);  // every rank takes part; with no CUDA it says tcp or fails
#endif
      return make_gloo(s);
#else
      fail(errc::backend_unavailable, "communicator gloo: eplb was built without Gloo (libgloo-dev not found)");
#endif
    case backend::nccl:
    case backend::stateless_nccl:
#if EPLB_HAVE_NCCL
      if (auto why = gpu_unavailable_reason(); !why.empty()) {
        fail(errc::backend_unavailable, "communicator {}: {}", to_string(b), why);
      }
      if (auto why = nccl_unavailable_reason(); !why.empty()) {
        fail(errc::backend_unavailable, "communicator {}: {}", to_string(b), why);
      }
      return make_nccl(s, b == backend::stateless_nccl);
#else
      fail(errc::backend_unavailable, "communicator {}: eplb was built without NCCL", to_string(b));
#endif
    case backend::cuda_ipc:
#if EPLB_HAVE_CUDA
      if (auto why = gpu_unavailable_reason(); !why.empty()) {
        fail(errc::backend_unavailable, "communicator cuda_ipc: {}", why);
      }
      return make_cuda_ipc(s);
#else
      fail(errc::backend_unavailable, "communicator cuda_ipc: eplb was built without CUDA");
#endif
  }
  fail(errc::internal, "make_communicator: unhandled backend {}", static_cast<int>(b));
}

}  // namespace

std::unique_ptr<communicator> make_communicator(backend b, const setup& s) {
  return std::make_unique<communicator>(make_transport(b, s));
}

std::vector<backend_status> backend_report() {
  std::vector<backend_status> out;
  out.push_back({backend::loopback, true, true, ""});
  out.push_back({backend::gloo, EPLB_HAVE_GLOO != 0, EPLB_HAVE_GLOO != 0,
                 EPLB_HAVE_GLOO ? "" : "built without Gloo (libgloo-dev not found)"});
#if EPLB_HAVE_NCCL
  auto why = gpu_unavailable_reason();
  if (why.empty()) why = nccl_unavailable_reason();  // loaded at run time (comm/nccl_library.hpp)
  for (auto b : {backend::nccl, backend::stateless_nccl}) out.push_back({b, true, why.empty(), why});
#else
  for (auto b : {backend::nccl, backend::stateless_nccl}) out.push_back({b, false, false, "built without NCCL"});
#endif
#if EPLB_HAVE_CUDA
  const auto no_gpu = gpu_unavailable_reason();
  out.push_back({backend::cuda_ipc, true, no_gpu.empty(), no_gpu});
#else
  out.push_back({backend::cuda_ipc, false, false, "built without CUDA"});
#endif
  return out;
}

}  // namespace comm
}  // namespace eplb

// The one place that asks each component for its version (see registry.cpp for the backends).
#include "eplb/versions.hpp"

#include <fmt/format.h>

#include "comm/backends.hpp"
#include "eplb_build_config.hpp"

#if EPLB_HAVE_GLOO
#include <gloo/config.h>
#endif

namespace eplb {
#if EPLB_HAVE_CUDA
namespace device::cuda {
/// CUDA's encoded versions (1000 * major + 10 * minor); 0 when there is no driver.
void versions(int& driver, int& runtime) noexcept;
}  // namespace device::cuda
#endif

namespace {

std::string cuda_text(int v) {
  return v > 0 ? fmt::format("{}.{}", v / 1000, (v % 1000) / 10) : std::string();
}

// NCCL encodes 2.28.3 as 22803 (since 2.9; 2903 before).
std::string nccl_text(int v) {
  if (v <= 0) return {};
  return v >= 10000 ? fmt::format("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
                    : fmt::format("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100);
}

void add_cuda(std::vector<component_version>& out) {
#if EPLB_HAVE_CUDA
  int driver = 0, runtime = 0;
  device::cuda::versions(driver, runtime);
  out.push_back({"cuda driver", cuda_text(driver), driver > 0 ? "cudaDriverGetVersion" : "no CUDA driver here"});
  out.push_back({"cuda runtime", cuda_text(runtime), "cudaRuntimeGetVersion"});
#else
  out.push_back({"cuda driver", "", "built without CUDA"});
  out.push_back({"cuda runtime", "", "built without CUDA"});
#endif
}

}  // namespace

std::vector<component_version> component_versions() noexcept {
  try {
    std::vector<component_version> out{{"eplb", EPLB_VERSION, "this library"}};
    add_cuda(out);
#if EPLB_HAVE_NCCL
    const int nccl = comm::nccl_runtime_version();
    out.push_back(
        {"nccl", nccl_text(nccl), nccl > 0 ? "ncclGetVersion of the loaded library" : "ncclGetVersion failed"});
#else
    out.push_back({"nccl", "", "built without NCCL"});
#endif
#if EPLB_HAVE_GLOO
    out.push_back(
        {"gloo", fmt::format("{}.{}.{}", GLOO_VERSION_MAJOR, GLOO_VERSION_MINOR, GLOO_VERSION_PATCH), "built against"});
#else
    out.push_back({"gloo", "", "built without Gloo"});
#endif
    return out;
  } catch (...) {
    return {};
  }
}

}  // namespace eplb

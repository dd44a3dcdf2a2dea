// Turning CUDA runtime errors into eplb::error; shared by the CUDA device and the NCCL communicators.
#pragma once

#include <cuda_runtime_api.h>

#include "util/fail.hpp"

namespace eplb::device::cuda {

/// Throws error(errc::device) naming the call; clears the runtime's last-error state first so a
/// failure does not leak into unrelated later calls.
inline void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  fail(errc::device, "{}: {} ({})", what, cudaGetErrorString(status), cudaGetErrorName(status));
}

/// Makes `ordinal` current for the calling thread (current devices are per thread).
inline void use_device(int ordinal) {
  check(cudaSetDevice(ordinal), "cudaSetDevice");
}

}  // namespace eplb::device::cuda

// Launchers for the serving-loop benchmark's kernels (plain types: included from host code).
#pragma once
#include <cstdint>

namespace eplb::bench {

/// c = a * b for n x n float matrices (n a multiple of 32), on `stream` (a cudaStream_t).
void launch_sgemm(const void* a, const void* b, void* c, int n, void* stream);
/// Spins one thread for `nanoseconds` of GPU time (globaltimer): a forward pass of a known length.
void launch_spin(std::uint64_t nanoseconds, void* stream);
/// Adds each physical slot's tokens of this step to `load` [layers x slots] (see the kernel).
void launch_route(std::int64_t* load, const std::int32_t* phy2log, const std::int32_t* replicas, int layers, int slots,
                  int experts, unsigned shift, void* stream);

}  // namespace eplb::bench

// Kernels of the serving-loop benchmark: a tiled SGEMM (the decode step's compute stand-in), a spin
// of a set GPU time (a forward pass of known length), and a router that counts tokens per physical
// slot into a device load buffer.
#include "serving_kernels.hpp"

namespace eplb::bench {
namespace {

constexpr int tile = 32;

__global__ void sgemm_kernel(const float* a, const float* b, float* c, int n) {
  __shared__ float as[tile][tile + 1], bs[tile][tile + 1];
  const int row = blockIdx.y * tile + threadIdx.y, col = blockIdx.x * tile + threadIdx.x;
  float acc = 0.f;
  for (int k0 = 0; k0 < n; k0 += tile) {
    as[threadIdx.y][threadIdx.x] = a[row * n + k0 + threadIdx.x];
    bs[threadIdx.y][threadIdx.x] = b[(k0 + threadIdx.y) * n + col];
    __syncthreads();
    for (int k = 0; k < tile; ++k) acc += as[threadIdx.y][k] * bs[k][threadIdx.x];
    __syncthreads();
  }
  c[row * n + col] = acc;
}

__device__ unsigned mix(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  return x ^ (x >> 16);
}

// Tokens per physical slot: a tenth of the experts are hot; replicas share their expert's tokens.
// `shift` rotates which experts are hot (phase 2 gives the sync rebalance something to move).
__global__ void route_kernel(std::int64_t* load, const std::int32_t* phy2log, const std::int32_t* replicas, int layers,
                             int slots, int experts, unsigned shift) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= layers * slots) return;
  const int layer = i / slots;
  const int e = phy2log[i];
  if (e < 0) return;
  const unsigned h = mix(static_cast<unsigned>(layer) * 7919U + (static_cast<unsigned>(e) + shift) % experts);
  const int tokens = (h % 10 == 0) ? 600 : 1 + static_cast<int>(h % 40);
  load[i] += tokens / max(1, replicas[layer * experts + e]);
}

__global__ void spin_kernel(std::uint64_t nanoseconds) {
  std::uint64_t start = 0, now = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < nanoseconds);
}

}  // namespace

void launch_spin(std::uint64_t nanoseconds, void* stream) {
  spin_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(nanoseconds);
}

void launch_sgemm(const void* a, const void* b, void* c, int n, void* stream) {
  const dim3 grid(n / tile, n / tile), block(tile, tile);
  sgemm_kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const float*>(a), static_cast<const float*>(b), static_cast<float*>(c), n);
}

void launch_route(std::int64_t* load, const std::int32_t* phy2log, const std::int32_t* replicas, int layers, int slots,
                  int experts, unsigned shift, void* stream) {
  const int threads = 256, blocks = (layers * slots + threads - 1) / threads;
  route_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(load, phy2log, replicas, layers, slots,
                                                                          experts, shift);
}

}  // namespace eplb::bench

// Physical limits on this machine, timed with CUDA events: D2H and H2D with pinned host memory,
// device-to-device inside one GPU, and peer copies GPU0 -> GPU1 (one direction, and both at once).
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#define CHECK(x)                                                    \
  do {                                                              \
    cudaError_t e_ = (x);                                           \
    if (e_ != cudaSuccess) {                                        \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); \
      return 1;                                                     \
    }                                                               \
  } while (0)

namespace {
double median_ms(cudaStream_t s, int reps, const std::function<void()>& work) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ms;
  work();  // warm-up
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, s);
    work();
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}
void report(const char* path, std::size_t bytes, double ms) {
  std::printf("{\"bench\":\"limit\",\"path\":\"%s\",\"bytes\":%zu,\"ms\":%.4f,\"gbps\":%.1f}\n", path, bytes, ms,
              bytes / (ms * 1e-3) / 1e9);
}
}  // namespace

int main() {
  const std::size_t n = std::size_t{1} << 30;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("skip: no GPU\n");
    return 77;
  }
  CHECK(cudaSetDevice(0));
  void *d0, *d0b, *h;
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CHECK(cudaMalloc(&d0, n));
  CHECK(cudaMalloc(&d0b, n));
  CHECK(cudaHostAlloc(&h, n, cudaHostAllocPortable));
  report("d2h_pinned", n, median_ms(s, 20, [&] { cudaMemcpyAsync(h, d0, n, cudaMemcpyDeviceToHost, s); }));
  report("h2d_pinned", n, median_ms(s, 20, [&] { cudaMemcpyAsync(d0, h, n, cudaMemcpyHostToDevice, s); }));
  report("d2d_one_gpu", n, median_ms(s, 20, [&] { cudaMemcpyAsync(d0b, d0, n, cudaMemcpyDeviceToDevice, s); }));
  if (count >= 2) {
    CHECK(cudaDeviceEnablePeerAccess(1, 0));
    CHECK(cudaSetDevice(1));
    void* d1;
    void* d1b;
    cudaStream_t s1;
    CHECK(cudaDeviceEnablePeerAccess(0, 0));
    CHECK(cudaMalloc(&d1, n));
    CHECK(cudaMalloc(&d1b, n));
    CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CHECK(cudaSetDevice(0));
    report("peer_0_to_1", n, median_ms(s, 20, [&] { cudaMemcpyPeerAsync(d1, 1, d0, 0, n, s); }));
    // Both directions at once: GPU1 pulls into its buffer while GPU0 pushes; timed on stream s.
    cudaEvent_t other;
    CHECK(cudaEventCreateWithFlags(&other, cudaEventDisableTiming));
    const double both = median_ms(s, 20, [&] {
      cudaEventRecord(other, s);
      cudaStreamWaitEvent(s1, other, 0);
      cudaMemcpyPeerAsync(d1, 1, d0, 0, n, s);
      cudaMemcpyPeerAsync(d0b, 0, d1b, 1, n, s1);
      cudaEventRecord(other, s1);
      cudaStreamWaitEvent(s, other, 0);
    });
    report("peer_both_directions_per_direction", n, both);
  }
  return 0;
}

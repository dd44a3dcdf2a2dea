// GPU suite (issue 15): copies that outlive a bounded wait (a stalled GPU) must not run under
// freed memory. The mailbox transports order the caller's stream after their copy lanes when a
// batch fails (device::cuda::order_after), so a buffer the caller frees after an event on its
// stream is freed only after those copies. Here a lane is stalled by a host function that waits
// for the test, and an event recorded on the caller's stream after the fence must not complete
// before the lane does. Exits 77 (skip) without a GPU.
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "device/cuda_handles.hpp"
#include "eplb/device/device.hpp"

using namespace eplb;
using namespace std::chrono_literals;

namespace {

// Holds a stream until released (bounded: 20 s), standing in for a copy on a stalled GPU.
void CUDART_CB hold(void* flag) {
  const auto until = std::chrono::steady_clock::now() + 20s;
  auto& released = *static_cast<std::atomic<bool>*>(flag);
  while (!released.load() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
}

bool completes_within(cudaEvent_t e, std::chrono::milliseconds limit) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (cudaEventQuery(e) == cudaErrorNotReady) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(1ms);
  }
  return cudaEventQuery(e) == cudaSuccess;
}

}  // namespace

TEST_CASE("order_after: the caller's stream waits for a stalled lane, the host does not") {
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  std::array<device::cuda::stream_handle, 2> lanes;
  device::cuda::stream_handle caller;
  std::atomic<bool> released{false};
  REQUIRE(cudaLaunchHostFunc(lanes[1].get(), hold, &released) == cudaSuccess);

  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(device::cuda::order_after(caller.get(), lanes));
  CHECK(std::chrono::steady_clock::now() - t0 < 100ms);  // ordering is on the GPU: no host wait
  device::cuda::event_handle after;
  after.record(caller.get());
  CHECK_FALSE(completes_within(after.get(), 200ms));  // the stalled lane holds it back
  CHECK(lanes[0].busy() == false);

  released = true;
  CHECK(completes_within(after.get(), 10s));
  CHECK_FALSE(lanes[1].busy());
}

TEST_CASE("order_after: memory released after the caller's stream outlives the stalled lane") {
  auto dev = device::make_cuda_device(0);
  auto caller = dev->create_stream();
  std::array<device::cuda::stream_handle, 1> lanes;
  std::atomic<bool> released{false};
  REQUIRE(cudaLaunchHostFunc(lanes[0].get(), hold, &released) == cudaSuccess);
  REQUIRE(device::cuda::order_after(static_cast<cudaStream_t>(caller->native_handle()), lanes));
  // As a rearranger does after a failed batch: the staging goes to release_after(caller).
  dev->release_after(dev->allocate(1 << 20, device::memory_kind::device), *caller);
  std::this_thread::sleep_for(50ms);
  CHECK(dev->collect_released() == 1);  // still held: the lane's work has not ended
  released = true;
  REQUIRE(cudaStreamSynchronize(lanes[0].get()) == cudaSuccess);
  caller->synchronize(10s);
  CHECK(dev->collect_released() == 0);  // freed once the lane and the caller passed it
}

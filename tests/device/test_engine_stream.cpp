// GPU suite (issue 18, item 1): eplb runs on the engine's own CUDA stream and waits on the engine's
// own event, both made here with the CUDA runtime: a one-rank eplb_state whose serving stream wraps
// a cudaStream_t rebalances and commits in that stream's order, and the stream outlives the wrapper.
// Exits 77 (skip) without a GPU.
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <cstdio>
#include <vector>

#include "check_error.hpp"
#include "eplb/state.hpp"
#include "tools/exchange.hpp"

using namespace eplb;
using namespace std::chrono_literals;

TEST_CASE("wrap_stream and wrap_event: the engine's handles, used and never destroyed") {
  auto dev = device::make_cuda_device(0);
  cudaStream_t native = nullptr;
  REQUIRE(cudaStreamCreate(&native) == cudaSuccess);
  cudaEvent_t native_event = nullptr;
  REQUIRE(cudaEventCreateWithFlags(&native_event, cudaEventDisableTiming) == cudaSuccess);
  CHECK_EPLB_ERROR(dev->wrap_stream(nullptr), errc::invalid_argument, "null");
  CHECK_EPLB_ERROR(dev->wrap_event(nullptr), errc::invalid_argument, "null");
  {
    auto engine = dev->wrap_stream(native);
    CHECK(engine->native_handle() == native);
    // Work the engine queued itself, then an event it records: eplb's side stream waits on it.
    auto buf = dev->allocate(1 << 20, device::memory_kind::device);
    REQUIRE(cudaMemsetAsync(buf.data(), 7, buf.size(), native) == cudaSuccess);
    REQUIRE(cudaEventRecord(native_event, native) == cudaSuccess);
    auto side = dev->create_stream();
    side->wait(dev->wrap_event(native_event));
    std::vector<std::byte> host(buf.size());
    side->copy(host.data(), buf.data(), buf.size());
    side->synchronize(10s);
    CHECK(host.front() == std::byte{7});
    CHECK(host.back() == std::byte{7});
    CHECK_NOTHROW(dev->wrap_event(native_event).wait(10s));
    engine->synchronize(10s);
  }
  // The wrappers are gone; the engine's handles still work and are the engine's to destroy.
  CHECK(cudaStreamQuery(native) == cudaSuccess);
  CHECK(cudaEventQuery(native_event) == cudaSuccess);
  CHECK(cudaEventDestroy(native_event) == cudaSuccess);
  CHECK(cudaStreamDestroy(native) == cudaSuccess);
}

TEST_CASE("eplb_state on the engine's stream: load copies, maps and commits in its order") {
  auto dev = device::make_cuda_device(0);
  cudaStream_t native = nullptr;
  REQUIRE(cudaStreamCreate(&native) == cudaSuccess);
  {
    auto serving = dev->wrap_stream(native);
    tools::exchange_config shape_cfg{.ranks = 1, .layers = 3, .experts = 8, .redundant = 4, .tensor_bytes = {4096, 64}};
    const auto start = tools::round_placement(shape_cfg, 0, {});
    tools::pattern_model model(tools::pattern_shape(shape_cfg), 0, *dev, *serving, start, 10s);
    state_params p;
    p.cfg = config::from_json(R"({"communicator": "loopback", "num_redundant_experts": 4, "window_size": 8,
                                  "step_interval": 16, "min_improvement": -1})");
    p.model = {model.shape(), 1, 1};
    p.dev = dev.get();
    p.serving_stream = serving.get();
    p.weights = model.weights();
    p.store = comm::make_memory_store();
    p.comm_setup.world = comm::make_loopback_world(1);
    p.log = [](std::string_view) {};
    eplb_state state(std::move(p));
    const auto slots = static_cast<std::size_t>(model.shape().num_physical);
    std::vector<std::int64_t> counts(3 * slots, 1);
    counts[0] = counts[slots] = counts[2 * slots] = 1000;  // slot 0 of every layer is hot
    std::vector<std::int64_t> totals(counts.size(), 0);
    int finished = 0;
    for (int step = 0; step < 40; ++step) {
      // The engine's router adds to the load buffer on its own stream (eplb never clears it since
      // issue 17: the copy writes the running totals).
      for (std::size_t i = 0; i < counts.size(); ++i) totals[i] += counts[i];
      REQUIRE(cudaMemcpyAsync(state.load_buffer(), totals.data(), totals.size() * sizeof(std::int64_t),
                              cudaMemcpyHostToDevice, native) == cudaSuccess);
      finished += state.step().rebalance_finished ? 1 : 0;
    }
    // One rank is always balanced, so min_improvement -1 makes every plan go ahead: its layers
    // are committed on the engine's stream.
    CHECK(finished >= 2);
    CHECK(state.stats().layers_committed >= 3);
    // The device maps the router reads agree with the host maps, read back on the engine's stream.
    std::vector<std::int32_t> phy2log(3 * slots);
    REQUIRE(cudaMemcpyAsync(phy2log.data(), state.device_phy2log(), phy2log.size() * 4, cudaMemcpyDeviceToHost,
                            native) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(native) == cudaSuccess);
    for (int l = 0; l < 3; ++l) {
      const auto row = state.maps().phy2log(l);
      for (std::size_t s = 0; s < slots; ++s) CHECK(phy2log[static_cast<std::size_t>(l) * slots + s] == row[s]);
      CHECK(model.mismatch(l, row, 0).empty());
    }
    state.stop();
  }
  // eplb is gone (its last frees were queued behind the stream's work); the stream still works.
  CHECK(cudaStreamSynchronize(native) == cudaSuccess);
  CHECK(cudaStreamQuery(native) == cudaSuccess);
  CHECK(cudaStreamDestroy(native) == cudaSuccess);
}

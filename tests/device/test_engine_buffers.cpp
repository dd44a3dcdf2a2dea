// GPU suite (issue 18, item 2): the engine's own buffers, made here with cudaMalloc on a stream made
// with cudaStreamCreate: an int32 load buffer that the "router" (stream-ordered copies of running
// totals, starting near 2^32 so they wrap) adds to, and int64 maps that eplb writes in stream
// order. After every rebalance the maps are read back and compared with the host maps, and the
// window eplb planned from with the counts written. Exits 77 (skip) without a GPU.
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <cstdio>
#include <thread>
#include <vector>

#include "check_error.hpp"
#include "eplb/state.hpp"
#include "tools/exchange.hpp"

using namespace eplb;
using namespace std::chrono_literals;

namespace {

std::int64_t count_at(int step, std::size_t i) {
  return 1 + (static_cast<std::int64_t>(step) * 7 + static_cast<std::int64_t>(i) * 13) % 50;
}

// cudaMalloc'd memory, freed at the end of the test (after the stream is idle).
struct device_memory {
  void* p = nullptr;
  explicit device_memory(std::size_t bytes) { REQUIRE(cudaMalloc(&p, bytes) == cudaSuccess); }
  ~device_memory() { (void)cudaFree(p); }
  device_memory(const device_memory&) = delete;
  device_memory& operator=(const device_memory&) = delete;
};

template <typename T>
std::vector<T> read_back(const void* p, std::size_t n, cudaStream_t s) {
  std::vector<T> out(n);
  REQUIRE(cudaMemcpyAsync(out.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost, s) == cudaSuccess);
  REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
  return out;
}

}  // namespace

TEST_CASE("the engine's int32 load and int64 maps (cudaMalloc, cudaStreamCreate): windows and maps") {
  auto dev = device::make_cuda_device(0);
  cudaStream_t native = nullptr;
  REQUIRE(cudaStreamCreate(&native) == cudaSuccess);
  const std::size_t layers = 3, experts = 8, slots = 12, width = 5, n = layers * slots;
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    device_memory load(n * 4), phy2log(n * 8), log2phy(layers * experts * width * 8), replicas(layers * experts * 8);
    {
      auto serving = dev->wrap_stream(native);
      tools::exchange_config shape_cfg{
          .ranks = 1, .layers = 3, .experts = 8, .redundant = 4, .tensor_bytes = {4096, 64}};
      tools::pattern_model model(tools::pattern_shape(shape_cfg), 0, *dev, *serving,
                                 tools::round_placement(shape_cfg, 0, {}), 10s);
      const int window = 6, interval = use_async ? 40 : 10, steps = use_async ? 130 : 45;
      const auto make_params = [&] {
        state_params p;
        p.cfg = config::from_json(R"({"communicator": "loopback", "num_redundant_experts": 4, "min_improvement": -1})");
        p.cfg.use_async = use_async;
        p.cfg.window_size = window;
        p.cfg.step_interval = interval;
        p.model = {model.shape(), 1, 1};
        p.dev = dev.get();
        p.serving_stream = serving.get();
        p.weights = model.weights();
        p.store = comm::make_memory_store();
        p.comm_setup.world = comm::make_loopback_world(1);
        p.log = [](std::string_view) {};
        return p;
      };
      // A host pointer is not device memory of the GPU: refused, naming the field.
      std::vector<std::int32_t> on_host(n);
      auto bad = make_params();
      bad.buffers.load = engine_buffer{on_host.data(), element_type::int32};
      CHECK_EPLB_ERROR(eplb_state(std::move(bad)), errc::invalid_argument, "buffers.load: not device memory of cuda");
      auto p = make_params();
      p.buffers.load = engine_buffer{load.p, element_type::int32};
      p.buffers.phy2log = engine_buffer{phy2log.p, element_type::int64};
      p.buffers.log2phy = engine_buffer{log2phy.p, element_type::int64};
      p.buffers.replica_count = engine_buffer{replicas.p, element_type::int64};
      std::vector<std::uint32_t> totals(n, 0xFFFFFFF0U);  // the router's counters wrap early on
      REQUIRE(cudaMemcpyAsync(load.p, totals.data(), n * 4, cudaMemcpyHostToDevice, native) == cudaSuccess);
      REQUIRE(cudaStreamSynchronize(native) == cudaSuccess);
      eplb_state state(std::move(p));
      CHECK(state.load_buffer() == nullptr);
      CHECK(state.device_phy2log() == nullptr);

      const auto check_maps = [&] {
        const auto p2l = read_back<std::int64_t>(phy2log.p, n, native);
        const auto l2p = read_back<std::int64_t>(log2phy.p, layers * experts * width, native);
        const auto cnt = read_back<std::int64_t>(replicas.p, layers * experts, native);
        for (std::size_t l = 0; l < layers; ++l) {
          const auto row = state.maps().phy2log(static_cast<int>(l));
          for (std::size_t s = 0; s < slots; ++s) CHECK(p2l[l * slots + s] == row[s]);
          for (std::size_t e = 0; e < experts; ++e) {
            const auto where = state.maps().log2phy(static_cast<int>(l), static_cast<int>(e));
            CHECK(cnt[l * experts + e] == state.maps().replica_count(static_cast<int>(l), static_cast<int>(e)));
            for (std::size_t k = 0; k < width; ++k) {
              CHECK(l2p[(l * experts + e) * width + k] == (k < where.size() ? where[k] : -1));
            }
          }
          CHECK(model.mismatch(static_cast<int>(l), row, 0).empty());
        }
      };
      check_maps();  // written at construction
      int trigger = -1, finished = 0, windows = 0, next_due = interval / 4;
      for (int step = 1; step <= steps; ++step) {
        // The background stages in wall time while these steps take microseconds: a serving loop's
        // steps take milliseconds, which keeps async rebalances within the interval.
        if (use_async && state.stats().rebalance_in_flight) std::this_thread::sleep_for(2ms);
        // The router adds this step's counts on the engine's stream (pageable source: the copy has
        // taken it when cudaMemcpyAsync returns).
        for (std::size_t i = 0; i < n; ++i) totals[i] += static_cast<std::uint32_t>(count_at(step, i));
        REQUIRE(cudaMemcpyAsync(load.p, totals.data(), n * 4, cudaMemcpyHostToDevice, native) == cudaSuccess);
        const auto rep = state.step();
        if (rep.rebalance_started) {
          // One still in flight at the due step defers the start to the step it finishes in; such
          // a late rebalance's window is tested in state/load_window.
          trigger = step == next_due ? step : -1;
          next_due = step + interval;
        }
        if (trigger > 0 && step == trigger + (use_async ? load_readback_lag_steps : 0)) {
          std::vector<std::int64_t> want(n, 0);
          for (int s = std::max(1, trigger - window + 1); s <= trigger; ++s) {
            for (std::size_t i = 0; i < n; ++i) want[i] += count_at(s, i);
          }
          const auto& got = state.window_load();
          CHECK_MESSAGE(std::equal(want.begin(), want.end(), got.flat().begin(), got.flat().end()), "step ", step);
          ++windows;
        }
        if (rep.rebalance_finished) {
          ++finished;
          check_maps();
        }
      }
      CHECK(windows >= 3);
      CHECK(finished >= 3);
      state.stop();
    }
    REQUIRE(cudaStreamSynchronize(native) == cudaSuccess);
  }
  CHECK(cudaStreamDestroy(native) == cudaSuccess);
}

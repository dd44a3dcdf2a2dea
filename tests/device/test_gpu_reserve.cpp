// GPU suite (issues 17 and 18): an engine's allocator hook backed by cudaMalloc / cudaHostAlloc
// gets every allocation eplb makes on a CUDA device; after eplb_state::reserve() it gets none over
// 100+ rebalances (sync and async, one rank on loopback; two ranks as threads over Gloo on GPU 0
// where Gloo was built), every committed layer is verified, and every block comes back through the
// hook's free (cudaFree / cudaFreeHost) with its size and kind. Exits 77 (skip) without a GPU.
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#include "counting_allocator.hpp"
#include "eplb/state.hpp"
#include "on_ranks.hpp"
#include "tools/exchange.hpp"

using namespace eplb;
using namespace std::chrono_literals;

namespace {

using eplb::testing::counting_allocator;

// The engine's allocator: the CUDA runtime's, every live block remembered and counted.
device::allocator_hook cuda_hook(const std::shared_ptr<counting_allocator>& a) {
  const auto get = [](std::size_t bytes, device::memory_kind kind) -> void* {
    void* p = nullptr;
    if (kind == device::memory_kind::device) return cudaMalloc(&p, bytes) == cudaSuccess ? p : nullptr;
    if (kind == device::memory_kind::pinned) {
      return cudaHostAlloc(&p, bytes, cudaHostAllocPortable) == cudaSuccess ? p : nullptr;
    }
    return counting_allocator::host_allocate(bytes, kind);
  };
  const auto put = [](void* p, device::memory_kind kind) {
    if (kind == device::memory_kind::device) {
      (void)cudaFree(p);
    } else if (kind == device::memory_kind::pinned) {
      (void)cudaFreeHost(p);
    } else {
      counting_allocator::host_free(p, kind);
    }
  };
  return counting_allocator::hook(a, get, put);
}

struct rank_outcome {
  std::string failure;
  std::int64_t by_reserve = 0, during = 0;
  int finished = 0;
  metrics m;
};

rank_outcome run_rank(int rank, int ranks, const std::string& communicator, bool use_async,
                      const std::shared_ptr<comm::store>& store, const std::shared_ptr<counting_allocator>& a) {
  rank_outcome out;
  auto dev = device::make_cuda_device(0);
  dev->set_allocator(cuda_hook(a));
  auto serving = dev->create_stream();
  tools::exchange_config shape{.ranks = ranks,
                               .layers = 3,
                               .experts = 8,
                               .redundant = 4,
                               .tensor_bytes = {4096, 64},
                               .device = device::backend_kind::cuda};
  const auto start = tools::round_placement(shape, 0, {});
  tools::pattern_model model(tools::pattern_shape(shape), rank, *dev, *serving, start, 20s);
  (void)model.snapshot(0);  // its scratch, made once
  state_params p;
  p.cfg = config::from_json(fmt::format(R"({{"communicator": "{}", "num_redundant_experts": 4, "window_size": 2,
      "step_interval": {}, "commit_lag_steps": 1, "min_improvement": -1, "use_async": {}, "timeout_ms": 30000}})",
                                        communicator, use_async ? 2 : 1, use_async));
  p.model = {model.shape(), 1, 1};
  p.rank = rank;
  p.dev = dev.get();
  p.serving_stream = serving.get();
  p.weights = model.weights();
  p.store = store;
  if (communicator == "loopback") p.comm_setup.world = comm::make_loopback_world(1);
  p.comm_setup.opts.staging_bytes = 4U << 20;
  p.log = [](std::string_view) {};
  {
    // The async session makes its staging ring as it starts, the rest comes from reserve(): both
    // before the first step, and both through the hook.
    const auto before = a->count();
    eplb_state state(std::move(p));
    state.reserve();
    out.by_reserve = a->count() - before;
    const auto reserved = a->count();
    const auto slots = static_cast<std::size_t>(model.shape().num_physical);
    try {
      for (int step = 0; out.finished < 100 && step < 100'000; ++step) {
        for (int l = 0; l < 3; ++l) {
          std::vector<std::int64_t> counts(slots, 1);
          counts[static_cast<std::size_t>(step / 3 + l) % slots] = 1000;  // a hot slot that moves
          state.record_load(l, counts);
        }
        const auto rep = state.step();
        if (rep.rebalance_finished) ++out.finished;
        if (rep.layers_committed == 0 && !rep.rebalance_finished) continue;
        for (int l = 0; l < 3; ++l) {
          if (auto bad = model.mismatch(l, state.maps().phy2log(l), rank); !bad.empty()) throw std::runtime_error(bad);
        }
      }
    } catch (const std::exception& e) {
      out.failure = fmt::format("rank {}: {}", rank, e.what());
    }
    state.stop();  // the background's last allocations (async) are counted, in the metric too
    out.during = a->count() - reserved;
    out.m = state.stats();
  }
  return out;
}

void check_run(const std::string& communicator, int ranks) {
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    auto store = comm::make_memory_store();
    std::vector<std::shared_ptr<counting_allocator>> allocators;
    for (int r = 0; r < ranks; ++r) allocators.push_back(std::make_shared<counting_allocator>());
    const auto results = eplb::testing::on_ranks(ranks, [&](int rank) {
      return run_rank(rank, ranks, communicator, use_async, store, allocators[static_cast<std::size_t>(rank)]);
    });
    for (const auto& r : results) {
      CHECK_MESSAGE(r.failure.empty(), r.failure);
      CHECK(r.finished >= 100);
      CHECK(r.by_reserve >= 1);
      CHECK(r.during == 0);
      CHECK(r.m.reserve_overflows == 0);
      CHECK(r.m.reserved_device_bytes > 0);
      if (communicator == "gloo") CHECK(r.m.reserved_pinned_bytes == (4U << 20));
      MESSAGE(fmt::format(
          "{} {}: {} allocations by the constructor and reserve ({} device + {} pinned bytes), {} over {} rebalances",
          communicator, use_async ? "async" : "sync", r.by_reserve, r.m.reserved_device_bytes,
          r.m.reserved_pinned_bytes, r.during, r.finished));
    }
    for (const auto& a : allocators) {
      std::lock_guard lock(a->mutex);
      CHECK(a->bad_frees == 0);
      CHECK(a->frees == a->allocations);
    }
  }
}

}  // namespace

TEST_CASE("cudaMalloc allocator hook: no allocation over 100+ rebalances after reserve(), one rank") {
  check_run("loopback", 1);
}

TEST_CASE("cudaMalloc allocator hook: no allocation over 100+ rebalances after reserve(), gloo on one GPU") {
  const auto report = comm::backend_report();
  if (!std::any_of(report.begin(), report.end(),
                   [](const auto& b) { return b.kind == comm::backend::gloo && b.built; }))
    return;
  check_run("gloo", 2);
}

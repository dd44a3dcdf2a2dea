// Embedding eplb in a serving loop: two EP ranks (threads here; processes or GPUs in an engine),
// each with its expert weights, an EplbState, and a loop that records router counts and calls
// step() once per forward step. Builds against an installed eplb: `pkg-config --cflags --libs eplb`.
#include <eplb/comm/communicator.hpp>
#include <eplb/comm/store.hpp>
#include <eplb/error.hpp>
#include <eplb/state.hpp>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

int main() {
  constexpr int ranks = 2, layers = 2, experts = 6, redundant = 2, slots = (experts + redundant) / ranks;
  constexpr std::size_t w13 = 1024, w2 = 512;  // bytes per expert of each tensor of the bundle
  auto world = eplb::comm::make_loopback_world(ranks);
  auto store = eplb::comm::make_memory_store();  // a TCP or file store across processes
  std::vector<std::thread> threads;
  int failures = 0;
  for (int rank = 0; rank < ranks; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        auto dev = eplb::device::make_host_device();  // make_cuda_device(gpu) in a GPU engine
        auto stream = dev->create_stream();           // the engine's serving stream
        eplb::state_params p;
        p.cfg.use_async = true;  // stage on a background thread, commit at step boundaries
        p.cfg.communicator = "loopback";
        p.cfg.num_redundant_experts = redundant;
        p.cfg.window_size = 50;
        p.cfg.step_interval = 100;
        p.model.shape = {.layers = layers,
                         .num_logical = experts,
                         .num_physical = experts + redundant,
                         .num_ranks = ranks,
                         .bundle = {{"w13", w13, w13, eplb::device::memory_kind::host},
                                    {"w2", w2, w2, eplb::device::memory_kind::host}}};
        // The live weights: per layer and tensor, this rank's slots side by side.
        std::vector<eplb::device::buffer> storage;
        p.weights.base.resize(layers);
        for (int l = 0; l < layers; ++l) {
          for (std::size_t bytes : {w13, w2}) {
            storage.push_back(dev->allocate(bytes * slots, eplb::device::memory_kind::host));
            p.weights.base[l].push_back(storage.back().data());
          }
        }
        p.rank = rank;
        p.dev = dev.get();
        p.serving_stream = stream.get();
        p.store = store;
        p.comm_setup.world = world;
        eplb::eplb_state state(std::move(p));
        for (int step = 0; step < 400; ++step) {
          std::this_thread::sleep_for(std::chrono::microseconds(200));  // the forward pass
          // The router's counts per physical slot (expert 0 is hot).
          for (int l = 0; l < layers; ++l) {
            std::vector<std::int64_t> counts(experts + redundant, 1);
            counts[state.maps().log2phy(l, 0)[0]] += 40;
            state.record_load(l, counts);
          }
          const auto report = state.step();
          if (report.rebalance_finished && rank == 0) {
            std::printf("step %d: rebalance done, expert 0 now has %d replicas in layer 0\n", step,
                        state.maps().replica_count(0, 0));
          }
        }
        // A graceful shutdown drains: no new rebalance (drain(), in the same step on every rank),
        // then step on until none is in flight (every rank sees it end in the same step), so
        // stop() has no transfer to abandon mid-way.
        state.drain();
        for (int extra = 0; extra < 1000 && state.stats().rebalance_in_flight; ++extra) (void)state.step();
        state.stop();
      } catch (const eplb::error& e) {
        std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
        ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  return failures == 0 ? 0 : 1;
}

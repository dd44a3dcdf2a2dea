// One rank of the serving-loop benchmark (one process per GPU via run_ranks.py). Every step runs a
// decode-step stand-in on the serving stream (tiled SGEMMs, each followed by an NCCL all-reduce as
// an MoE engine's tensor-parallel reduction; or, with --forward-us, a spin kernel of that length),
// a router kernel that counts tokens into EplbState's device load buffer, EplbState::step(), and a
// stream synchronize (the engine reads its samples).
//
// Phase 0 (issue 17): the cost of step() when no rebalance is due. Blocks of steps without eplb at
// all (the router counts into a buffer of the bench's own) alternate with blocks of the same loop
// with a sync EplbState whose rebalance is never due, so drift hits both alike; reported: the
// step-time inflation against the baseline (mean, p99) and the host time inside step() (p50, p99).
// Phase 1 (async): a full-model rebalance runs behind the loop (gloo on the background thread).
// Step times are split into steps with and without a rebalance in flight; after it, every slot is
// checked to hold its new expert's bytes. Phase 2 (sync): a fresh EplbState with use_async false
// and nccl rearranges the whole model inside one step: that step's time is the stall.
// Prints one JSON line per rank.
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <numeric>
#include <vector>

#include "eplb/comm/store.hpp"
#include "eplb/error.hpp"
#include "eplb/state.hpp"
#include "serving_kernels.hpp"

using namespace eplb;
using clock_type = std::chrono::steady_clock;

namespace {

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(fmt::format("{}: {}", what, cudaGetErrorString(e)));
}
void nccl_ok(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw std::runtime_error(fmt::format("{}: {}", what, ncclGetErrorString(r)));
}

// The byte every slot of `expert` in `layer` holds (distinct per expert within a layer).
unsigned char expert_byte(int layer, int expert) {
  return static_cast<unsigned char>((layer * 37 + expert) & 0xff);
}

struct percentiles {
  double mean = 0, p50 = 0, p99 = 0;
  std::size_t n = 0;
};
percentiles summarize(std::vector<double> v) {
  percentiles p;
  p.n = v.size();
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  p.mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  p.p50 = v[v.size() / 2];
  p.p99 = v[std::min(v.size() - 1, v.size() * 99 / 100)];
  return p;
}
std::string json(const percentiles& p) {
  return fmt::format(R"({{"n":{},"mean":{:.4f},"p50":{:.4f},"p99":{:.4f}}})", p.n, p.mean, p.p50, p.p99);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eplb serving-loop benchmark rank"};
  std::string store_spec, label = "model", async_backend = "gloo";
  int rank = 0, size = 2, layers = 48, experts = 128, redundant = 16, gemm_n = 1536, gemm_calls = 4;
  int quiet_steps = 300, max_steps = 20000;
  std::size_t expert_bytes = 9'437'184, allreduce_bytes = 4 << 20;
  app.add_option("--rank", rank)->required();
  app.add_option("--size", size)->required();
  app.add_option("--store", store_spec)->required();
  app.add_option("--label", label);
  app.add_option("--layers", layers);
  app.add_option("--experts", experts);
  app.add_option("--redundant", redundant);
  app.add_option("--expert-bytes", expert_bytes);
  app.add_option("--gemm-n", gemm_n, "SGEMM size (multiple of 32)");
  app.add_option("--gemm-calls", gemm_calls, "SGEMM + all-reduce pairs per step");
  app.add_option("--allreduce-bytes", allreduce_bytes);
  app.add_option("--quiet-steps", quiet_steps, "steps before the rebalance and after it");
  app.add_option("--max-steps", max_steps);
  app.add_option("--async-backend", async_backend, "communicator of the async rebalance: gloo or cuda_ipc");
  double ipc_max_gbps = 0;
  std::string gloo_via = "auto";
  std::size_t chunk_bytes = 0;
  int lanes = 0;
  app.add_option("--chunk-bytes", chunk_bytes, "async communicator's chunk size (0 = its default)");
  app.add_option("--lanes", lanes, "async communicator's lanes (0 = eplb_state's choice)");
  app.add_option("--gloo-transport", gloo_via, "gloo: auto | tcp | shared_memory");
  app.add_option("--ipc-max-gbps", ipc_max_gbps, "cuda_ipc: cap on each rank's copy rate (0 = none)");
  double forward_us = 0;
  int quiet_rounds = 10, quiet_block = 200;
  std::string phases = "all";
  app.add_option("--forward-us", forward_us, "forward pass: a spin kernel of this many us (0: SGEMMs + all-reduces)");
  app.add_option("--quiet-rounds", quiet_rounds, "phase 0: baseline / eplb block pairs");
  app.add_option("--quiet-block", quiet_block, "phase 0: steps per block");
  app.add_option("--phases", phases, "all | quiet (phase 0 only: step cost against the baseline)")
      ->check(CLI::IsMember({"all", "quiet"}));
  CLI11_PARSE(app, argc, argv);
  try {
    if (device::cuda_device_count() < size) return 77;
    auto dev = device::make_cuda_device(rank);
    auto serving = dev->create_stream();
    auto cs = static_cast<cudaStream_t>(serving->native_handle());
    const auto timeout = std::chrono::milliseconds(120'000);
    // The launcher's file store only bootstraps a TCP store served by rank 0, as a deployment would.
    auto files =
        comm::make_prefix_store(comm::make_file_store(store_spec.substr(store_spec.find(':') + 1)), "serving-" + label);
    std::unique_ptr<comm::tcp_store_server> server;
    if (rank == 0) {
      server = std::make_unique<comm::tcp_store_server>("127.0.0.1", 0);
      files->set("tcp-port", std::to_string(server->port()));
    }
    const auto port = static_cast<std::uint16_t>(std::stoi(files->get("tcp-port", timeout)));
    auto store = comm::make_tcp_store("127.0.0.1", port, timeout);

    // The engine's own NCCL communicator (its tensor-parallel group).
    ncclUniqueId id;
    if (rank == 0) {
      nccl_ok(ncclGetUniqueId(&id), "ncclGetUniqueId");
      store->set("nccl-id", std::string(reinterpret_cast<const char*>(&id), sizeof id));
    } else {
      const auto v = store->get("nccl-id", timeout);
      std::copy(v.begin(), v.end(), reinterpret_cast<char*>(&id));
    }
    ncclComm_t tp;
    nccl_ok(ncclCommInitRank(&tp, size, id, rank), "ncclCommInitRank");

    const auto n = static_cast<std::size_t>(gemm_n);
    auto a = dev->allocate(n * n * 4, device::memory_kind::device);
    auto b = dev->allocate(n * n * 4, device::memory_kind::device);
    auto c = dev->allocate(n * n * 4, device::memory_kind::device);
    auto ar = dev->allocate(allreduce_bytes, device::memory_kind::device);
    serving->fill(a.data(), std::byte{0}, a.size());
    serving->fill(b.data(), std::byte{0}, b.size());
    serving->fill(ar.data(), std::byte{0}, ar.size());

    // Live expert weights: two tensors (w13, w2 in a 2:1 split), every slot filled with its expert's byte.
    const int slots = experts + redundant;
    exec::model_shape shape{.layers = layers, .num_logical = experts, .num_physical = slots, .num_ranks = size};
    const std::size_t w13 = expert_bytes / 3 * 2, w2 = expert_bytes - w13;
    shape.bundle = {{"w13", w13, w13, device::memory_kind::device}, {"w2", w2, w2, device::memory_kind::device}};
    const int local = shape.slots_per_rank();
    const auto start = placement::initial(layers, experts, slots, size).phy2log();
    std::vector<device::buffer> storage;
    exec::rank_weights weights;
    weights.base.resize(static_cast<std::size_t>(layers));
    for (int l = 0; l < layers; ++l) {
      for (const auto& t : shape.bundle) {
        storage.push_back(dev->allocate(t.stride * static_cast<std::size_t>(local), device::memory_kind::device));
        weights.base[static_cast<std::size_t>(l)].push_back(storage.back().data());
      }
      for (int t = 0; t < 2; ++t) {
        for (int s = 0; s < local; ++s) {
          const auto e = start(static_cast<std::size_t>(l), static_cast<std::size_t>(rank * local + s));
          serving->fill(weights.slot(shape, l, t, s), std::byte{expert_byte(l, e)},
                        shape.bundle[static_cast<std::size_t>(t)].bytes_per_expert);
        }
      }
    }
    serving->synchronize(timeout);

    const auto make_state = [&](bool async, const std::string& prefix, const matrix<expert_id>& initial,
                                int first_rebalance) {
      state_params sp;
      sp.cfg.use_async = async;
      sp.cfg.communicator = async ? async_backend : "nccl";
      sp.comm_setup.opts.cuda_ipc_max_gbps = ipc_max_gbps;
      if (async) {
        sp.comm_setup.opts.gloo_via = comm::parse_gloo_transport(gloo_via);
        if (chunk_bytes != 0) sp.comm_setup.opts.chunk_bytes = chunk_bytes;
        sp.comm_setup.opts.lanes = lanes;
      }
      sp.cfg.num_redundant_experts = redundant;
      sp.cfg.step_interval = 4 * first_rebalance;  // the first rebalance comes after a quarter interval
      sp.cfg.window_size = first_rebalance;
      sp.cfg.timeout = timeout;
      sp.model.shape = shape;
      sp.rank = rank;
      sp.dev = dev.get();
      sp.serving_stream = serving.get();
      sp.weights = weights;
      sp.store = comm::make_prefix_store(store, prefix);
      sp.initial_phy2log = initial;
      sp.log = [](std::string_view) {};
      return std::make_unique<eplb_state>(std::move(sp));
    };

    struct step_times {
      std::vector<double> quiet_ms, busy_ms, quiet_step_us, busy_step_us;
      double rebalance_s = 0;
      std::uint64_t bytes = 0;
      int layers_committed = 0;
    };
    // The forward pass, its router counting into `load` by the maps `phy2log` and `replicas`.
    const auto forward_into = [&](std::int64_t* load, const std::int32_t* phy2log, const std::int32_t* replicas,
                                  unsigned shift) {
      if (forward_us > 0) {
        bench::launch_spin(static_cast<std::uint64_t>(forward_us * 1000), cs);
      } else {
        for (int k = 0; k < gemm_calls; ++k) {
          bench::launch_sgemm(a.data(), b.data(), c.data(), gemm_n, cs);
          nccl_ok(ncclAllReduce(ar.data(), ar.data(), allreduce_bytes / 4, ncclFloat, ncclSum, tp, cs), "all-reduce");
        }
      }
      bench::launch_route(load, phy2log, replicas, layers, slots, experts, shift, cs);
      cuda_ok(cudaGetLastError(), "kernel launch");
    };
    const auto forward = [&](eplb_state& st, unsigned shift) {
      forward_into(st.load_buffer(), st.device_phy2log(), st.device_replica_count(), shift);
    };

    // Phase 0: step cost with no rebalance due (the first one is due after a million steps),
    // against the same loop without eplb: its router counts into the bench's own buffer and reads
    // copies of the maps.
    struct quiet_result {
      percentiles baseline, eplb, step_call_us;
    };
    const auto run_quiet_phase = [&] {
      auto st = make_state(false, "quiet", start, 1'000'000);
      auto own_load = dev->allocate(static_cast<std::size_t>(layers * slots) * 8, device::memory_kind::device);
      auto own_p2l = dev->allocate(static_cast<std::size_t>(layers * slots) * 4, device::memory_kind::device);
      auto own_cnt = dev->allocate(static_cast<std::size_t>(layers * experts) * 4, device::memory_kind::device);
      serving->fill(own_load.data(), std::byte{0}, own_load.size());
      serving->copy(own_p2l.data(), st->device_phy2log(), own_p2l.size());
      serving->copy(own_cnt.data(), st->device_replica_count(), own_cnt.size());
      const auto baseline_step = [&] {
        forward_into(reinterpret_cast<std::int64_t*>(own_load.data()),
                     reinterpret_cast<const std::int32_t*>(own_p2l.data()),
                     reinterpret_cast<const std::int32_t*>(own_cnt.data()), 0);
        cuda_ok(cudaStreamSynchronize(cs), "serving stream");
      };
      std::vector<double> base_ms, eplb_ms, call_us;
      for (int i = 0; i < 50; ++i) baseline_step();  // warm-up (CUDA, NCCL, clocks)
      for (int round = 0; round < quiet_rounds; ++round) {
        for (int i = 0; i < quiet_block; ++i) {
          const auto t0 = clock_type::now();
          baseline_step();
          base_ms.push_back(std::chrono::duration<double, std::milli>(clock_type::now() - t0).count());
        }
        for (int i = 0; i < quiet_block; ++i) {
          const auto t0 = clock_type::now();
          forward(*st, 0);
          const auto t1 = clock_type::now();
          const auto rep = st->step();
          const auto t2 = clock_type::now();
          cuda_ok(cudaStreamSynchronize(cs), "serving stream");
          const auto t3 = clock_type::now();
          if (rep.rebalance_started) throw std::runtime_error("phase 0: a rebalance started");
          eplb_ms.push_back(std::chrono::duration<double, std::milli>(t3 - t0).count());
          call_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
        }
      }
      st->stop();
      return quiet_result{summarize(base_ms), summarize(eplb_ms), summarize(call_us)};
    };
    const auto quiet0 = run_quiet_phase();
    std::cout << fmt::format(
        R"({{"bench":"serving_step_cost","label":"{}","ranks":{},"rank":{},"layers":{},"experts":{},"forward_us":{},)"
        R"("gemm_n":{},"gemm_calls":{},"step_ms_baseline":{},"step_ms_eplb_quiet":{},"quiet_inflation_mean":{:.5f},)"
        R"("quiet_inflation_p99":{:.5f},"step_call_us_quiet":{}}})"
        "\n",
        label, size, rank, layers, experts, forward_us, gemm_n, gemm_calls, json(quiet0.baseline), json(quiet0.eplb),
        quiet0.eplb.mean / quiet0.baseline.mean - 1, quiet0.eplb.p99 / quiet0.baseline.p99 - 1,
        json(quiet0.step_call_us));
    if (phases == "quiet") {
      ncclCommDestroy(tp);
      comm::store_barrier(*files, "done", size, timeout);
      return 0;
    }

    // Phase 1: async rebalance behind the serving loop.
    step_times t;
    auto state = make_state(true, "async", start, quiet_steps);
    struct step_sample {
      double total_ms, launch_ms, step_ms;
      int committed;
      bool started;
      int step;
    };
    std::vector<step_sample> slow;  // busy steps, to explain the tail
    int finished_at = -1;
    const int warmup_steps = 50;
    for (int step = 1; step <= max_steps; ++step) {
      const bool busy = state->stats().rebalance_in_flight;
      const auto t0 = clock_type::now();
      forward(*state, 0);
      const auto t1 = clock_type::now();
      const auto rep = state->step();
      const auto t2 = clock_type::now();
      cuda_ok(cudaStreamSynchronize(cs), "serving stream");
      const auto t3 = clock_type::now();
      const bool in_rebalance = busy || rep.rebalance_started;
      if (in_rebalance) {
        slow.push_back({std::chrono::duration<double, std::milli>(t3 - t0).count(),
                        std::chrono::duration<double, std::milli>(t1 - t0).count(),
                        std::chrono::duration<double, std::milli>(t2 - t1).count(), rep.layers_committed,
                        rep.rebalance_started, step});
      }
      if (step > warmup_steps) {  // the first steps pay for CUDA and NCCL warm-up, not for us
        (in_rebalance ? t.busy_ms : t.quiet_ms).push_back(std::chrono::duration<double, std::milli>(t3 - t0).count());
        (in_rebalance ? t.busy_step_us : t.quiet_step_us)
            .push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
      }
      t.layers_committed += rep.layers_committed;
      if (rep.rebalance_finished) finished_at = step;
      if (finished_at > 0 && step >= finished_at + quiet_steps) break;
    }
    if (finished_at < 0) throw std::runtime_error(fmt::format("the rebalance did not finish in {} steps", max_steps));
    t.rebalance_s = state->stats().rebalance_seconds;
    t.bytes = state->stats().bytes_moved;
    const auto moved = state->maps().phy2log();
    state->stop();
    state.reset();

    // Every slot holds its new expert: first and last byte of each tensor.
    int checked = 0;
    for (int l = 0; l < layers; ++l) {
      for (int tn = 0; tn < 2; ++tn) {
        const auto bytes = shape.bundle[static_cast<std::size_t>(tn)].bytes_per_expert;
        for (int s = 0; s < local; ++s) {
          const auto e = moved(static_cast<std::size_t>(l), static_cast<std::size_t>(rank * local + s));
          if (e < 0) continue;
          unsigned char got[2];
          const auto* p = static_cast<const unsigned char*>(static_cast<const void*>(weights.slot(shape, l, tn, s)));
          cuda_ok(cudaMemcpy(&got[0], p, 1, cudaMemcpyDeviceToHost), "check");
          cuda_ok(cudaMemcpy(&got[1], p + bytes - 1, 1, cudaMemcpyDeviceToHost), "check");
          if (got[0] != expert_byte(l, e) || got[1] != expert_byte(l, e)) {
            throw std::runtime_error(fmt::format("layer {} slot {} tensor {}: holds byte {:#x}, expert {} has {:#x}", l,
                                                 s, tn, got[0], e, expert_byte(l, e)));
          }
          ++checked;
        }
      }
    }

    // Phase 2: the same loop with synchronous rebalances (nccl): one step carries the whole move.
    // The first one also sets up NCCL's connections; the second, on a shifted load, is the stall
    // a running engine sees.
    const int sync_first = 50;
    auto sync_state = make_state(false, "sync", moved, sync_first);
    std::vector<double> sync_quiet_ms, stalls;
    std::uint64_t sync_bytes = 0, bytes_before = 0;
    for (int step = 1; step <= 5 * sync_first + 20; ++step) {
      const auto t0 = clock_type::now();
      forward(*sync_state, step <= sync_first ? 17U : 41U);
      const auto rep = sync_state->step();
      cuda_ok(cudaStreamSynchronize(cs), "serving stream");
      const double ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
      if (rep.rebalance_started) {
        stalls.push_back(ms);
        sync_bytes = sync_state->stats().bytes_moved - bytes_before;
        bytes_before = sync_state->stats().bytes_moved;
      } else if (step > sync_first) {
        sync_quiet_ms.push_back(ms);
      }
    }
    if (stalls.size() != 2) throw std::runtime_error(fmt::format("expected 2 sync rebalances, saw {}", stalls.size()));
    const double stall_ms = stalls[1];
    sync_state->stop();
    sync_state.reset();
    ncclCommDestroy(tp);
    comm::store_barrier(*files, "done", size, timeout);  // rank 0 serves the store until everyone is done

    const auto quiet = summarize(t.quiet_ms), busy = summarize(t.busy_ms);
    std::sort(slow.begin(), slow.end(), [](const auto& a, const auto& b) { return a.total_ms > b.total_ms; });
    std::string tail = "[";
    for (std::size_t i = 0; i < std::min<std::size_t>(5, slow.size()); ++i) {
      const auto& x = slow[i];
      tail += fmt::format(
          R"({}{{"step":{},"total_ms":{:.2f},"launch_ms":{:.2f},"step_call_ms":{:.2f},"committed":{},"started":{}}})",
          i ? "," : "", x.step, x.total_ms, x.launch_ms, x.step_ms, x.committed, x.started);
    }
    tail += "]";
    const auto sync_quiet = summarize(sync_quiet_ms);
    std::cout << fmt::format(
        R"({{"bench":"serving","label":"{}","async_backend":"{}","ipc_max_gbps":{},"chunk_bytes":{},"lanes":{},"ranks":{},"rank":{},"layers":{},"gemm_n":{},"gemm_calls":{},)"
        R"("step_ms_quiet":{},"step_ms_rebalancing":{},"mean_inflation":{:.4f},"p99_inflation":{:.4f},)"
        R"("baseline_ms":{},"quiet_vs_baseline_mean":{:.5f},"rebalancing_vs_baseline_mean":{:.5f},"rebalancing_vs_baseline_p99":{:.5f},)"
        R"("step_call_us_quiet":{},"step_call_us_rebalancing":{},"rebalance_s":{:.3f},"bytes_received":{},)"
        R"("layers_committed":{},"slots_checked":{},"sync_stall_ms":{:.2f},"sync_first_stall_ms":{:.2f},"sync_quiet_p50_ms":{:.3f},)"
        R"("sync_bytes_received":{},"slowest_busy_steps":{}}})"
        "\n",
        label, async_backend == "gloo" ? fmt::format("gloo-{}", gloo_via) : async_backend, ipc_max_gbps, chunk_bytes,
        lanes, size, rank, layers, gemm_n, gemm_calls, json(quiet), json(busy), busy.mean / quiet.mean,
        busy.p99 / quiet.p99, json(quiet0.baseline), quiet.mean / quiet0.baseline.mean - 1,
        busy.mean / quiet0.baseline.mean - 1, busy.p99 / quiet0.baseline.p99 - 1, json(summarize(t.quiet_step_us)),
        json(summarize(t.busy_step_us)), t.rebalance_s, t.bytes, t.layers_committed, checked, stall_ms, stalls[0],
        sync_quiet.p50, sync_bytes, tail);
    return 0;
  } catch (const std::exception& e) {
    std::cout << fmt::format("rank {}: error {}\n", rank, e.what());
    return 1;
  }
}

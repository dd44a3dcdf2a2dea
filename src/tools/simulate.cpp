#include "tools/simulate.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <future>
#include <iostream>
#include <numeric>
#include <random>
#include <thread>

#include "eplb/comm/store.hpp"
#include "eplb/state.hpp"
#include "tools/exchange.hpp"
#include "tools/faulty_comm.hpp"
#include "tools/rank_processes.hpp"
#include "util/fail.hpp"

namespace eplb::tools {

using nlohmann::json;
using clock_type = std::chrono::steady_clock;

preset_shape find_preset(const std::string& name) {
  // Bundle sizes are the real per-expert bytes; the host device divides them (bytes_scale).
  if (name == "tiny") return {4, 16, 4, 4, 1, {4096, 2048, 64}, 200, 100};
  if (name == "qwen3-30b-a3b") return {48, 128, 16, 1, 1, {6291456, 3145728}, 3000, 1000};
  if (name == "deepseek-v3") return {58, 256, 32, 8, 4, {29360128, 14680064, 229376, 114688}, 3000, 1000};
  fail(errc::invalid_argument, "--preset: unknown preset \"{}\" (allowed: tiny, qwen3-30b-a3b, deepseek-v3)", name);
}

void validate(const simulate_config& c) {
  const auto p = find_preset(c.preset);
  if (c.ranks < 2 || c.ranks > 64) fail(errc::invalid_argument, "--ranks: must be in 2..64, got {}", c.ranks);
  if ((p.experts + p.redundant) % c.ranks != 0) {
    fail(errc::invalid_argument, "--ranks: {} does not divide the {} slots per layer of preset {}", c.ranks,
         p.experts + p.redundant, c.preset);
  }
  if (c.steps <= 0) fail(errc::invalid_argument, "--steps: must be > 0, got {}", c.steps);
  if (c.step_interval < 0 || c.window < 0) fail(errc::invalid_argument, "--step-interval and --window must be >= 0");
  if (c.tokens_per_step <= 0) fail(errc::invalid_argument, "--tokens: must be > 0, got {}", c.tokens_per_step);
  if (c.forward.count() < 0) fail(errc::invalid_argument, "--forward-us: must be >= 0, got {}", c.forward.count());
  if (c.fail_rank >= c.ranks)
    fail(errc::invalid_argument, "--fail-rank: {} is not a rank (0..{})", c.fail_rank, c.ranks - 1);
  if ((c.fail_rank >= 0) != (c.fail_step >= 0)) fail(errc::invalid_argument, "--fail-rank and --fail-step go together");
  if (c.transfer_fault_rank >= c.ranks) {
    fail(errc::invalid_argument, "--transfer-fault-rank: {} is not a rank (0..{})", c.transfer_fault_rank, c.ranks - 1);
  }
  if ((c.transfer_fault_rank >= 0) != (c.transfer_fault_step >= 0)) {
    fail(errc::invalid_argument, "--transfer-fault-rank and --transfer-fault-step go together");
  }
  if (c.backend != "auto") (void)comm::parse_backend(c.backend);
  const bool loopback =
      c.backend == "loopback" || (c.backend == "auto" && !c.procs && c.device == device::backend_kind::host);
  if (loopback && c.procs) fail(errc::invalid_argument, "--backend loopback runs ranks as threads: drop --procs");
  if (c.device == device::backend_kind::cuda && !c.procs) {
    // One process per GPU, as engines run; ranks as threads sharing CUDA is not supported yet.
    fail(errc::invalid_argument, "--device cuda runs one process per GPU: add --procs");
  }
  if (loopback && c.device == device::backend_kind::cuda) {
    fail(errc::invalid_argument, "--backend loopback moves host memory only: use gloo (or nccl with --sync) on cuda");
  }
}

namespace {

std::string resolved_backend(const simulate_config& c) {
  if (c.backend != "auto") return c.backend;
  if (!c.procs && c.device == device::backend_kind::host) return "loopback";
  return c.use_async ? "gloo" : (c.device == device::backend_kind::cuda ? "nccl" : "gloo");
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}

// Routes tokens with a Zipf load over a permutation of the experts that changes every drift_steps.
class router {
 public:
  router(const simulate_config& cfg, int layers, int experts, int rank)
      : cfg_(cfg), layers_(layers), experts_(experts), rng_(cfg.seed * 1315423911ULL + static_cast<unsigned>(rank)) {}

  std::vector<std::int64_t> route(int layer, int step, const placement& maps) {
    const int phase = step / cfg_.drift_steps;
    auto& dist = distribution(layer, phase);
    std::vector<std::int64_t> counts(static_cast<std::size_t>(maps.num_physical()), 0);
    for (int t = 0; t < cfg_.tokens_per_step; ++t) {
      const int e = dist(rng_);
      const int replicas = maps.replica_count(layer, e);
      const int slot = maps.log2phy(layer, e)[static_cast<std::size_t>(t % replicas)];  // vLLM: index % count
      ++counts[static_cast<std::size_t>(slot)];
    }
    return counts;
  }

 private:
  std::discrete_distribution<int>& distribution(int layer, int phase) {
    const auto key = std::make_pair(layer, phase);
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    if (cache_.size() > static_cast<std::size_t>(4 * layers_)) cache_.clear();
    // The same hot experts on every rank: the permutation depends on the seed, layer and phase only.
    std::mt19937_64 perm_rng(cfg_.seed * 7919 + static_cast<std::uint64_t>(layer) * 104729 +
                             static_cast<std::uint64_t>(phase));
    std::vector<int> order(static_cast<std::size_t>(experts_));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), perm_rng);
    std::vector<double> w(static_cast<std::size_t>(experts_));
    for (int i = 0; i < experts_; ++i)
      w[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = 1.0 / std::pow(i + 1.0, cfg_.zipf);
    return cache_.emplace(key, std::discrete_distribution<int>(w.begin(), w.end())).first->second;
  }

  const simulate_config& cfg_;
  int layers_, experts_;
  std::mt19937_64 rng_;
  std::map<std::pair<int, int>, std::discrete_distribution<int>> cache_;
};

std::string verify_layer(const eplb_state& state, pattern_model& model, int layer, int rank) {
  const auto& shape = model.shape();
  const auto reference = model.reference();
  const auto snap = model.snapshot(layer);
  std::size_t at = 0;
  for (int t = 0; t < static_cast<int>(shape.bundle.size()); ++t) {
    const auto bytes = shape.bundle[static_cast<std::size_t>(t)].bytes_per_expert;
    for (int s = 0; s < shape.slots_per_rank(); ++s, at += bytes) {
      const expert_id e = state.maps().phy2log(layer)[rank * shape.slots_per_rank() + s];
      if (e >= 0 && exec::checksum({snap.data() + at, bytes}) != reference(layer, e, t)) {
        return fmt::format("rank {}: layer {} slot {} tensor {} does not hold expert {}'s bytes", rank, layer, s, t, e);
      }
    }
  }
  return {};
}

class progress {
 public:
  progress(bool enabled, int steps) : enabled_(enabled), tty_(enabled && ::isatty(STDOUT_FILENO)), steps_(steps) {}
  void update(int step, const metrics& m, bool force) {
    if (!enabled_) return;
    const int every = tty_ ? std::max(1, steps_ / 200) : std::max(1, steps_ / 10);
    if (!force && step % every != 0) return;
    const std::string state = m.rebalance_in_flight ? "rebalancing" : "serving";
    if (tty_) {
      const int width = 30;
      const int filled = width * step / steps_;
      std::cout << fmt::format("\r[{}{}] step {}/{}  balancedness {:.3f}  rebalances {}  {:<12}",
                               std::string(filled, '#'), std::string(width - filled, '.'), step, steps_,
                               m.balancedness_after, m.rebalances, state)
                << std::flush;
      if (step == steps_) std::cout << '\n';
    } else {
      std::cout << fmt::format("step {}/{}: balancedness {:.3f}, rebalances {}, {}\n", step, steps_,
                               m.balancedness_after, m.rebalances, state)
                << std::flush;
    }
  }

 private:
  bool enabled_, tty_;
  int steps_;
};

json run_rank(const simulate_config& cfg, int rank, std::shared_ptr<comm::store> store,
              std::shared_ptr<comm::loopback_world> world, bool print_progress) {
  const auto p = find_preset(cfg.preset);
  json out = {{"rank", rank}, {"verified", false}, {"failure", ""}};
  std::vector<double> busy_us, idle_us;
  json commits = json::array(), rebalances = json::array();
  try {
    const bool cuda = cfg.device == device::backend_kind::cuda;
    auto dev =
        cuda
            ? device::make_cuda_device(rank % std::max(1, device::cuda_device_count()))
            : device::make_host_device({.max_delay = cfg.inject_delay, .seed = cfg.seed + static_cast<unsigned>(rank)});
    auto stream = dev->create_stream();
    const std::size_t scale = cfg.bytes_scale != 0 ? cfg.bytes_scale : (cuda || cfg.preset == "tiny" ? 1 : 1024);
    exchange_config shape_cfg{
        .ranks = cfg.ranks, .layers = p.layers, .experts = p.experts, .redundant = p.redundant, .device = cfg.device};
    shape_cfg.tensor_bytes.clear();
    for (auto b : p.tensor_bytes) shape_cfg.tensor_bytes.push_back(std::max<std::size_t>(1, b / scale));
    const auto start_map = round_placement(shape_cfg, 0, {});
    pattern_model model(pattern_shape(shape_cfg), rank, *dev, *stream, start_map, cfg.timeout);
    state_params sp;
    sp.cfg.window_size = cfg.window != 0 ? cfg.window : p.window;
    sp.cfg.step_interval = cfg.step_interval != 0 ? cfg.step_interval : p.step_interval;
    if (cfg.commit_lag >= 0) sp.cfg.commit_lag_steps = cfg.commit_lag;
    sp.cfg.num_redundant_experts = p.redundant;
    sp.cfg.use_async = cfg.use_async;
    sp.cfg.communicator = resolved_backend(cfg);
    sp.cfg.timeout = cfg.timeout;
    sp.model = {model.shape(), p.groups, p.nodes};
    sp.model.shape.ranks_per_node = cfg.ranks / std::max(1, p.nodes);
    sp.rank = rank;
    sp.dev = dev.get();
    sp.serving_stream = stream.get();
    sp.weights = model.weights();
    sp.store = store;
    sp.comm_setup.world = world;
    sp.comm_setup.opts.hostname = cfg.hostname;
    sp.log = [](std::string_view) {};
    const bool transfer_fault = cfg.transfer_fault_rank >= 0;
    auto faults = std::make_shared<fault_switch>();
    if (transfer_fault) {
      // The state makes its communicators itself (and again after a failure); the faulty rank's
      // are wrapped, so the fault breaks the same communicator the state would use.
      sp.comm_wrap = [faults, mine = rank == cfg.transfer_fault_rank](std::unique_ptr<comm::communicator> c,
                                                                      int) -> std::unique_ptr<comm::communicator> {
        ++faults->made;
        if (!mine) return c;
        return std::make_unique<faulty_communicator>(std::move(c), faults);
      };
    }
    json errors = json::array();
    eplb_state state(std::move(sp));
    router route(cfg, p.layers, p.experts, rank);
    progress bar(print_progress && rank == 0, cfg.steps);
    int rebalance = -1, layer = 0, trigger_step = 0;
    try {
      for (int step = 1; step <= cfg.steps; ++step) {
        if (rank == cfg.fail_rank && step == cfg.fail_step) {
          if (world) comm::mark_dead(*world, rank);
          out["failure"] = fmt::format("rank {}: died at step {} (injected)", rank, step);
          out["died"] = true;
          return out;
        }
        // The forward pass stand-in: background staging overlaps it, as it overlaps real forwards.
        if (cfg.forward.count() > 0) std::this_thread::sleep_for(cfg.forward);
        for (int l = 0; l < p.layers; ++l) state.record_load(l, route.route(l, step, state.maps()));
        if (transfer_fault && rank == cfg.transfer_fault_rank && step == cfg.transfer_fault_step) faults->countdown = 1;
        const bool busy = state.stats().rebalance_in_flight;
        const auto committed_before = state.stats().layers_committed;
        const auto t0 = clock_type::now();
        step_report rep;
        try {
          rep = state.step();
        } catch (const error& e) {
          // With an injected transfer fault every rank reports an error (its own, or a peer's) and
          // serves on; the layers it committed in this step are still checked below.
          if (!transfer_fault || e.code() == errc::verification_failed) throw;
          errors.push_back({{"step", step}, {"error", fmt::format("[{}] {}", to_string(e.code()), e.what())}});
        }
        const auto committed_now = static_cast<int>(state.stats().layers_committed - committed_before);
        const double us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
        (busy || rep.rebalance_started ? busy_us : idle_us).push_back(us);
        // Sync: a rebalance starts and commits in one step. Async: commits in a step belong to the
        // rebalance in flight, and a new one may start after them in the same step.
        const auto begin_rebalance = [&] {
          ++rebalance;
          layer = 0;
          trigger_step = step;
        };
        if (rep.rebalance_started && !cfg.use_async) begin_rebalance();
        for (int k = 0; k < committed_now; ++k, ++layer) {
          commits.push_back({rebalance, layer, step});
          if (auto bad = verify_layer(state, model, layer, rank); !bad.empty())
            fail(errc::verification_failed, "{}", bad);
        }
        if (rep.rebalance_finished) {
          const auto& m = state.stats();
          rebalances.push_back({{"trigger_step", trigger_step},
                                {"finish_step", step},
                                {"before", m.balancedness_before},
                                {"after", m.balancedness_after},
                                {"seconds", m.rebalance_seconds}});
        }
        if (rep.rebalance_started && cfg.use_async) begin_rebalance();
        bar.update(step, state.stats(), step == cfg.steps);
      }
      // A rank that died outside a rebalance is noticed here: every live rank must reach the end.
      comm::store_barrier(*store, "simulate-end", cfg.ranks, cfg.timeout);
    } catch (const error& e) {
      // A peer died or stalled, or this rank failed: stop cleanly, then check that every layer
      // still holds exactly what its (committed) maps say.
      out["failure"] = fmt::format("rank {}: [{}] {}", rank, to_string(e.code()), e.what());
      state.stop();
      bool intact = true;
      for (int l = 0; l < p.layers && intact; ++l) intact = verify_layer(state, model, l, rank).empty();
      out["weights_intact"] = intact;
      out["errors"] = errors;
      out["busy_us"] = busy_us;
      out["idle_us"] = idle_us;
      out["commits"] = commits;
      out["rebalances"] = rebalances;
      return out;
    }
    for (int l = 0; l < p.layers; ++l) {
      if (auto bad = verify_layer(state, model, l, rank); !bad.empty()) fail(errc::verification_failed, "{}", bad);
    }
    out["bytes_moved"] = state.stats().bytes_moved;
    out["errors"] = errors;
    out["communicators_made"] = transfer_fault ? faults->made.load() : 1;
    out["verified"] = true;
    state.stop();
  } catch (const error& e) {
    std::string what = e.what();
    if (e.code() == errc::timeout && what.find("simulate-end") != std::string::npos) {
      what = fmt::format("{} (a rank stopped before the end)", what);
    }
    out["failure"] = fmt::format("rank {}: [{}] {}", rank, to_string(e.code()), what);
  }
  out["busy_us"] = busy_us;
  out["idle_us"] = idle_us;
  out["commits"] = commits;
  out["rebalances"] = rebalances;
  return out;
}

json merge(const simulate_config& cfg, const std::vector<json>& ranks) {
  json out;
  bool verified = true, consistent = true;
  std::uint64_t bytes = 0;
  std::vector<double> all, busy, idle;
  std::string failure;
  for (const auto& r : ranks) {
    verified = verified && r.value("verified", false);
    if (failure.empty() && !r.value("failure", std::string()).empty() && !r.value("died", false))
      failure = r["failure"];
    bytes += r.value("bytes_moved", std::uint64_t{0});
    for (double v : r.value("busy_us", std::vector<double>{})) busy.push_back(v / 1000), all.push_back(v / 1000);
    for (double v : r.value("idle_us", std::vector<double>{})) idle.push_back(v / 1000), all.push_back(v / 1000);
    consistent = consistent && r.value("commits", json::array()) == ranks.front().value("commits", json::array());
  }
  if (failure.empty()) {
    for (const auto& r : ranks) {
      if (!r.value("failure", std::string()).empty()) failure = r["failure"];
    }
  }
  const auto& rb = ranks.front().value("rebalances", json::array());
  out["verified"] = verified;
  out["rebalances"] = rb.size();
  out["balancedness_before"] = rb.empty() ? 0.0 : rb.front().value("before", 0.0);
  out["balancedness_after"] = rb.empty() ? 0.0 : rb.back().value("after", 0.0);
  out["bytes_moved"] = bytes;
  out["step_p50_ms"] = percentile(all, 0.5);
  out["step_p99_ms"] = percentile(all, 0.99);
  out["step_rebalancing_p50_ms"] = percentile(busy, 0.5);
  out["step_rebalancing_p99_ms"] = percentile(busy, 0.99);
  out["step_idle_p50_ms"] = percentile(idle, 0.5);
  out["step_idle_p99_ms"] = percentile(idle, 0.99);
  out["commit_steps_consistent"] = consistent;
  // Errors a run went on after (--transfer-fault-*), and the rebalances that finished after the last.
  int errors = 0, last_error_step = -1;
  for (const auto& r : ranks) {
    for (const auto& e : r.value("errors", json::array())) {
      ++errors;
      last_error_step = std::max(last_error_step, e.value("step", -1));
    }
  }
  out["errors"] = errors;
  out["rebalances_after_errors"] = errors == 0 ? 0 : std::count_if(rb.begin(), rb.end(), [&](const json& x) {
    return x.value("trigger_step", 0) > last_error_step;
  });
  out["rebalance_log"] = rb;
  out["ranks"] = cfg.ranks;
  out["steps"] = cfg.steps;
  json details = json::array();
  for (const auto& r : ranks) {
    json d = {{"rank", r.value("rank", -1)}, {"failure", r.value("failure", std::string())}};
    if (r.contains("errors")) d["errors"] = r["errors"];
    if (r.contains("weights_intact")) d["weights_intact"] = r["weights_intact"];
    if (r.contains("communicators_made")) d["communicators_made"] = r["communicators_made"];
    details.push_back(d);
  }
  out["rank_reports"] = details;
  if (!failure.empty()) out["failure"] = failure;
  return out;
}

}  // namespace

json simulate_rank(const simulate_config& cfg, int rank, std::shared_ptr<comm::store> store, bool print_progress) {
  return run_rank(cfg, rank, std::move(store), nullptr, print_progress);
}

json run_simulation(const simulate_config& cfg, const std::string& self_exe, const std::vector<std::string>& child_args,
                    bool print_progress) {
  validate(cfg);
  std::vector<json> ranks;
  if (!cfg.procs) {
    auto store = comm::make_memory_store();
    auto world = comm::make_loopback_world(cfg.ranks);
    std::vector<std::future<json>> futures;
    for (int r = 0; r < cfg.ranks; ++r) {
      futures.push_back(
          std::async(std::launch::async, [&, r] { return run_rank(cfg, r, store, world, print_progress); }));
    }
    for (auto& f : futures) ranks.push_back(f.get());
  } else {
    const auto deadline = clock_type::now() + std::chrono::hours(1);
    // A rank that is stopped (SIGSTOP) or wedged never exits: once another rank failed, it gets
    // twice the timeout, then it is killed.
    for (const auto& p :
         run_rank_processes(self_exe, child_args, cfg.ranks, deadline, 2 * cfg.timeout + std::chrono::seconds(2))) {
      const int r = static_cast<int>(ranks.size());
      json doc = json::parse(p.result, nullptr, false);
      if (doc.is_discarded() || !doc.is_object()) {
        doc = {{"rank", r},
               {"verified", false},
               {"failure", fmt::format("rank {}: exited with status {} without a report", r, p.exit_status)}};
      }
      ranks.push_back(doc);
    }
  }
  return merge(cfg, ranks);
}

std::string summary_table(const simulate_config& cfg, const json& r) {
  std::string out =
      fmt::format("eplb simulate: preset {}, {} ranks ({}), {}, {} backend, {} device, {} steps\n", cfg.preset,
                  cfg.ranks, cfg.procs ? "processes" : "threads", cfg.use_async ? "async" : "sync",
                  resolved_backend(cfg), device::to_string(cfg.device), cfg.steps);
  out += fmt::format("{:>9}  {:>12}  {:>11}  {:>27}  {:>11}\n", "rebalance", "trigger step", "commit step",
                     "balancedness before -> after", "duration ms");
  int i = 0;
  for (const auto& rb : r["rebalance_log"]) {
    out += fmt::format("{:>9}  {:>12}  {:>11}  {:>18.4f} -> {:.4f}  {:>11.1f}\n", ++i, rb.value("trigger_step", 0),
                       rb.value("finish_step", 0), rb.value("before", 0.0), rb.value("after", 0.0),
                       rb.value("seconds", 0.0) * 1000);
  }
  out += fmt::format("ideal balancedness 1.0000; bytes moved (all ranks) {:.2f} MB\n",
                     r.value("bytes_moved", std::uint64_t{0}) / 1e6);
  out += fmt::format(
      "host time in step(): while rebalancing p50 {:.3f} ms / p99 {:.3f} ms; otherwise p50 {:.3f} / p99 {:.3f} ms\n",
      r.value("step_rebalancing_p50_ms", 0.0), r.value("step_rebalancing_p99_ms", 0.0),
      r.value("step_idle_p50_ms", 0.0), r.value("step_idle_p99_ms", 0.0));
  out += fmt::format("verification: {}; commits in the same step on every rank: {}\n",
                     r.value("verified", false) ? "every committed layer verified on every rank" : "FAILED",
                     r.value("commit_steps_consistent", false) ? "yes" : "NO");
  if (r.contains("failure")) out += fmt::format("failure: {}\n", r["failure"].get<std::string>());
  return out;
}

}  // namespace eplb::tools

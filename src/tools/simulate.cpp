#include "tools/simulate.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <future>
#include <iostream>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <thread>

#include "eplb/comm/store.hpp"
#include "eplb/config.hpp"
#include "eplb/state.hpp"
#include "tools/exchange.hpp"
#include "tools/faulty_comm.hpp"
#include "tools/rank_processes.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"
#include "util/json_text.hpp"

namespace eplb::tools {

using nlohmann::json;
using clock_type = std::chrono::steady_clock;

preset_shape find_preset(const std::string& name) {
  // Bundle sizes are the real per-expert bytes; the host device divides them (bytes_scale).
  if (name == "tiny") return {4, 16, 4, 4, 1, {4096, 2048, 64}, 200, 100};
  if (name == "qwen3-30b-a3b") return {48, 128, 16, 1, 1, {6291456, 3145728}, 3000, 1000};
  if (name == "deepseek-v3") return {58, 256, 32, 8, 4, {29360128, 14680064, 229376, 114688}, 3000, 1000};
  fail(errc::invalid_argument, "--preset: unknown preset \"{}\" (allowed: tiny, qwen3-30b-a3b, deepseek-v3)",
       excerpt(name));
}

namespace {

// Every number a flag gives is range-checked: "must be in LO..HI, got V" naming the flag.
void check_range(const char* flag, std::int64_t v, std::int64_t lo, std::int64_t hi) {
  if (v < lo || v > hi) fail(errc::invalid_argument, "{}: must be in {}..{}, got {}", flag, lo, hi, v);
}

// The injected faults: a rank (-1: none) and a step within the run, given together.
void check_fault(const simulate_config& c, const char* rank_flag, int rank, const char* step_flag, int step) {
  check_range(rank_flag, rank, -1, c.ranks - 1);
  if (step != -1) check_range(step_flag, step, 1, c.steps);
  if ((rank >= 0) != (step >= 0)) fail(errc::invalid_argument, "{} and {} go together", rank_flag, step_flag);
}

// Bounds that keep a run's time and memory finite whatever the flags say.
void check_numbers(const simulate_config& c, const preset_shape& p) {
  check_range("--steps", c.steps, 1, 10'000'000);  // each step keeps a few numbers for the report
  check_range("--step-interval", c.step_interval, 0, std::numeric_limits<int>::max());
  check_range("--window", c.window, 0, std::numeric_limits<int>::max());
  // The load window holds window x layers x slots counters of 8 bytes on every rank.
  const auto window = static_cast<std::int64_t>(c.window != 0 ? c.window : p.window);
  const std::int64_t counters = window * p.layers * (p.experts + p.redundant);
  if (counters > (std::int64_t{1} << 28)) {
    fail(errc::invalid_argument, "--window: {} steps x {} layers x {} slots is {} load counters (at most {}, 2 GiB)",
         window, p.layers, p.experts + p.redundant, counters, std::int64_t{1} << 28);
  }
  check_range("--commit-lag", c.commit_lag, -1, 1000);
  check_range("--tokens", c.tokens_per_step, 1, 1 << 20);
  check_range("--drift-steps", c.drift_steps, 1, std::numeric_limits<int>::max());  // a divisor
  check_range("--forward-us", c.forward.count(), 0, 1'000'000);
  check_range("--inject-delay-ms", c.inject_delay.count(), 0, 60'000);
  check_timeout("--timeout-ms", c.timeout, errc::invalid_argument);
  check_fault(c, "--fail-rank", c.fail_rank, "--fail-step", c.fail_step);
  check_fault(c, "--transfer-fault-rank", c.transfer_fault_rank, "--transfer-fault-step", c.transfer_fault_step);
}

}  // namespace

void validate(const simulate_config& c) {
  const auto p = find_preset(c.preset);
  if (c.ranks < 2 || c.ranks > 64) fail(errc::invalid_argument, "--ranks: must be in 2..64, got {}", c.ranks);
  if ((p.experts + p.redundant) % c.ranks != 0) {
    fail(errc::invalid_argument, "--ranks: {} does not divide the {} slots per layer of preset {}", c.ranks,
         p.experts + p.redundant, c.preset);
  }
  check_numbers(c, p);
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

// A digest of every layer's phy2log: survivors of a failure must end with identical maps.
std::string maps_digest(const eplb_state& state) {
  const auto& flat = state.maps().phy2log().flat();
  return fmt::format("{:016x}", exec::checksum(std::as_bytes(std::span(flat.data(), flat.size()))));
}

std::string verify_layer(const eplb_state& state, pattern_model& model, int layer, int rank) {
  return model.mismatch(layer, state.maps().phy2log(layer), rank);
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
      out["maps_digest"] = maps_digest(state);
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
    out["maps_digest"] = maps_digest(state);
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

// Every error any rank reported, for the merged report: errors the run went on after (an injected
// transfer fault) and failures that ended a rank. At most 100; the rank reports keep the rest.
json collect_failures(const std::vector<json>& ranks, int& errors, int& last_error_step) {
  json list = json::array();
  std::size_t omitted = 0;
  const auto add = [&](json entry) {
    if (list.size() < 100) {
      list.push_back(std::move(entry));
    } else {
      ++omitted;
    }
  };
  for (const auto& r : ranks) {
    const int rank = r.value("rank", -1);
    for (const auto& e : r.value("errors", json::array())) {
      ++errors;
      last_error_step = std::max(last_error_step, e.value("step", -1));
      add({{"rank", rank}, {"step", e.value("step", -1)}, {"error", e.value("error", "")}, {"recovered", true}});
    }
    if (const auto f = r.value("failure", std::string()); !f.empty()) {
      add({{"rank", rank}, {"error", f}, {"recovered", false}});
    }
  }
  if (omitted > 0) list.push_back({{"omitted", omitted}});
  return list;
}

// The first rank whose commits (rebalance, layer, step) differ from the first surviving rank's, or -1.
int first_inconsistent(const std::vector<json>& ranks, const std::vector<bool>& alive) {
  std::optional<json> reference;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (!alive[i]) continue;
    auto commits = ranks[i].value("commits", json::array());
    if (!reference) {
      reference = std::move(commits);
    } else if (commits != *reference) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

// The run's outcome: "verified" is true when every surviving rank (all but those that died on
// purpose, --fail-rank) verified its live slots: at the end, or after a failure (weights_intact).
// "failure" is set by any rank's failure, by commits that differ between ranks, and by a rank that
// exited unsuccessfully after writing its report; "failures" lists every rank's errors.
void merge_outcome(const std::vector<json>& ranks, json& out) {
  std::vector<bool> alive;
  bool verified = true;
  std::string failure, fallback;
  for (const auto& r : ranks) {
    alive.push_back(!r.value("died", false));
    if (alive.back()) verified = verified && (r.value("verified", false) || r.value("weights_intact", false));
    const auto f = r.value("failure", std::string());
    if (f.empty()) continue;
    if (alive.back() && failure.empty()) failure = f;  // a survivor names what went wrong
    if (fallback.empty()) fallback = f;
  }
  if (failure.empty()) failure = fallback;
  const int differs = first_inconsistent(ranks, alive);
  if (failure.empty() && differs >= 0) {
    failure =
        fmt::format("rank {} committed layers in other steps than rank 0 (maps may differ between ranks)", differs);
  }
  int errors = 0, last_error_step = -1;
  out["failures"] = collect_failures(ranks, errors, last_error_step);
  out["verified"] = verified;
  out["commit_steps_consistent"] = differs < 0;
  out["errors"] = errors;
  const auto& rb = out["rebalance_log"];
  out["rebalances_after_errors"] = errors == 0 ? 0 : std::count_if(rb.begin(), rb.end(), [&](const json& x) {
    return x.value("trigger_step", 0) > last_error_step;
  });
  if (!failure.empty()) out["failure"] = failure;
}

json merge(const simulate_config& cfg, const std::vector<json>& ranks) {
  json out;
  std::uint64_t bytes = 0;
  std::vector<double> all, busy, idle;
  for (const auto& r : ranks) {
    bytes += r.value("bytes_moved", std::uint64_t{0});
    for (double v : r.value("busy_us", std::vector<double>{})) busy.push_back(v / 1000), all.push_back(v / 1000);
    for (double v : r.value("idle_us", std::vector<double>{})) idle.push_back(v / 1000), all.push_back(v / 1000);
  }
  const auto& rb = ranks.front().value("rebalances", json::array());
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
  out["rebalance_log"] = rb;
  out["ranks"] = cfg.ranks;
  out["steps"] = cfg.steps;
  merge_outcome(ranks, out);
  json details = json::array();
  for (const auto& r : ranks) {
    json d = {{"rank", r.value("rank", -1)}, {"failure", r.value("failure", std::string())}};
    for (const char* key : {"errors", "weights_intact", "communicators_made", "died", "exit_status", "maps_digest"}) {
      if (r.contains(key)) d[key] = r[key];
    }
    details.push_back(d);
  }
  out["rank_reports"] = details;
  return out;
}

}  // namespace

json merge_reports(const simulate_config& cfg, const std::vector<json>& ranks) {
  return merge(cfg, ranks);
}

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
    const auto deadline = deadline_after(std::chrono::hours(1));
    // A rank that is stopped (SIGSTOP) or wedged never exits: once another rank failed, it gets
    // twice the timeout, then it is killed.
    for (const auto& p :
         run_rank_processes(self_exe, child_args, cfg.ranks, deadline, 2 * cfg.timeout + std::chrono::seconds(2))) {
      const int r = static_cast<int>(ranks.size());
      json doc = json::parse(p.result, nullptr, false);
      if (doc.is_discarded() || !doc.is_object()) {
        doc = {
            {"rank", r},
            {"verified", false},
            {"failure", p.killed ? fmt::format("rank {}: did not finish in time (killed)", r)
                                 : fmt::format("rank {}: exited with status {} without a report", r, p.exit_status)}};
      } else if (p.exit_status != 0 && doc.value("failure", std::string()).empty()) {
        // Its report says all went well, yet the process failed after writing it (a crash at exit).
        doc["failure"] = fmt::format("rank {}: exited with status {} after its report", r, p.exit_status);
      }
      doc["exit_status"] = p.exit_status;
      ranks.push_back(doc);
    }
  }
  return merge(cfg, ranks);
}

namespace {

// The errors ranks reported (transfer faults the run went on after, and failures), a few lines.
std::string failures_text(const json& r) {
  const auto errors = r.value("errors", 0);
  std::string out;
  if (errors > 0) {
    out += fmt::format("errors: {} reported by ranks (the run went on; {} rebalances finished after the last)\n",
                       errors, r.value("rebalances_after_errors", 0));
  }
  int shown = 0;
  for (const auto& f : r.value("failures", json::array())) {
    if (!f.contains("error")) continue;
    if (++shown > 8) {
      out += "  ... (more in --json's \"failures\")\n";
      break;
    }
    if (f.value("recovered", false)) {
      out += fmt::format("  rank {} step {}: {}\n", f.value("rank", -1), f.value("step", -1), f.value("error", ""));
    } else {  // a failure names its rank itself
      out += fmt::format("  {} (ended the rank's run)\n", f.value("error", ""));
    }
  }
  return out;
}

}  // namespace

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
                     r.value("verified", false) ? "every committed layer verified on every surviving rank" : "FAILED",
                     r.value("commit_steps_consistent", false) ? "yes" : "NO");
  out += failures_text(r);
  if (r.contains("failure")) out += fmt::format("failure: {}\n", r["failure"].get<std::string>());
  return out;
}

}  // namespace eplb::tools

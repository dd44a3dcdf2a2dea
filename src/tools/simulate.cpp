// `eplb simulate`: the presets, the checks of a run's flags, and the run itself, its ranks as
// threads or processes (simulate_rank.cpp runs one rank; simulate_report.cpp merges their reports).
#include "tools/simulate.hpp"

#include <fmt/format.h>

#include <sstream>

#include <future>
#include <limits>

#include "eplb/config.hpp"
#include "tools/rank_processes.hpp"
#include "tools/runnable.hpp"
#include "tools/simulate_rank.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"
#include "util/json_text.hpp"

namespace eplb::tools {

using nlohmann::json;

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

// --scale: steps in order inside the run, sizes that change and hold every expert, and no other
// fault or trace flag (their checks assume one rank set).
void check_scale(const simulate_config& c, const preset_shape& p) {
  if (c.scale.empty()) return;
  if (c.fail_rank >= 0 || c.stop_rank >= 0 || c.transfer_fault_rank >= 0 || !c.report_path.empty() ||
      !c.jsonl_path.empty()) {
    fail(errc::invalid_argument,
         "--scale does not go with --fail-rank, --stop-rank, --transfer-fault-rank, --report or --jsonl yet");
  }
  const int spr = (p.experts + p.redundant) / c.ranks;
  int last_step = 1, size = c.ranks;
  for (const auto& [step, next] : c.scale) {
    if (step <= last_step || step > c.steps) {
      fail(errc::invalid_argument, "--scale: step {} must be after {} and at most --steps {}", step, last_step,
           c.steps);
    }
    if (next < 1 || next > 64 || next == size) {
      fail(errc::invalid_argument, "--scale: size {} at step {} must be 1..64 and differ from {}", next, step, size);
    }
    if (next * spr < p.experts) {
      fail(errc::invalid_argument, "--scale: {} ranks x {} slots at step {} cannot hold {} experts", next, spr, step,
           p.experts);
    }
    last_step = step;
    size = next;
  }
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
  check_scale(c, p);
  if (c.survive && c.fail_rank < 0) fail(errc::invalid_argument, "--survive needs --fail-rank and --fail-step");
  if (c.no_reload && !c.survive) fail(errc::invalid_argument, "--no-reload needs --survive");
  if (c.survive && c.ranks < 2) fail(errc::invalid_argument, "--survive needs --ranks >= 2 (a survivor)");
  if (c.survive && (!c.report_path.empty() || !c.jsonl_path.empty())) {
    fail(errc::invalid_argument,
         "--survive does not go with --report or --jsonl yet (their load samples assume "
         "a fixed rank count)");
  }
  check_fault(c, "--stop-rank", c.stop_rank, "--stop-step", c.stop_step);
  check_fault(c, "--transfer-fault-rank", c.transfer_fault_rank, "--transfer-fault-step", c.transfer_fault_step);
}

}  // namespace

int worker_count(const simulate_config& c) {
  int workers = c.ranks, size = c.ranks;
  for (const auto& [step, next] : c.scale) {
    workers += std::max(0, next - size);
    size = next;
  }
  return workers;
}

scale_role role_of(const simulate_config& c, int worker) {
  if (worker < c.ranks) return {.rank = worker, .set_size = c.ranks};
  int next_worker = c.ranks, size = c.ranks;
  for (std::size_t k = 0; k < c.scale.size(); ++k) {
    const auto [step, next] = c.scale[k];
    for (int r = size; r < next; ++r, ++next_worker) {
      if (next_worker == worker) {
        return {.join_event = static_cast<int>(k), .rank = r, .start_step = step - 1, .set_size = next};
      }
    }
    size = next;
  }
  fail(errc::invalid_argument, "--rank: {} is not a worker of this run (0..{})", worker, worker_count(c) - 1);
}

std::vector<std::pair<int, int>> parse_scale(const std::string& text) {
  std::vector<std::pair<int, int>> out;
  std::size_t at = 0;
  while (at < text.size()) {
    const auto end = std::min(text.find(',', at), text.size());
    const auto item = text.substr(at, end - at);
    int step = 0, size = 0;
    char colon = 0;
    std::istringstream in(item);
    if (!(in >> step >> colon >> size) || colon != ':' || !in.eof()) {
      fail(errc::invalid_argument, "--scale: '{}' is not STEP:SIZE", excerpt(item));
    }
    out.emplace_back(step, size);
    at = end + 1;
  }
  return out;
}

preset_shape preset_for(const simulate_config& c) {
  auto p = find_preset(c.preset);
  if (c.ranks < 1) return p;
  const int slots = p.experts + p.redundant;
  p.redundant += (c.ranks - slots % c.ranks) % c.ranks;
  // Hierarchical placement needs nodes dividing the ranks and the groups: the largest such count.
  while (p.nodes > 1 && (c.ranks % p.nodes != 0 || p.groups % p.nodes != 0)) --p.nodes;
  return p;
}

std::string adjustment(const simulate_config& c) {
  const auto given = find_preset(c.preset);
  const auto used = preset_for(c);
  std::string out;
  if (used.redundant != given.redundant) {
    out = fmt::format("{} redundant slots instead of {} (so that {} ranks hold {} slots each)", used.redundant,
                      given.redundant, c.ranks, (used.experts + used.redundant) / c.ranks);
  }
  if (used.nodes != given.nodes) {
    out += fmt::format("{}{} nodes instead of {} (a count that divides {} ranks and {} groups)",
                       out.empty() ? "" : "; ", used.nodes, given.nodes, c.ranks, used.groups);
  }
  return out;
}

namespace {

// The backend and device, checked here so that a run that cannot work is refused up front (exit
// 2) instead of starting every rank and failing each.
void check_backend_and_device(const simulate_config& c) {
  const auto kind = comm::parse_backend(resolved_backend(c));
  check_runnable(kind, c.device);
  config probe;
  probe.use_async = c.use_async;
  probe.communicator = comm::to_string(kind);
  try {
    (void)probe.resolved_communicator();  // refuses a backend the mode does not allow, naming why
  } catch (const error& e) {
    fail(errc::invalid_argument, "--backend {} with {}: {}", comm::to_string(kind), c.use_async ? "--async" : "--sync",
         e.what());
  }
  (void)parse_policy(c.policy, "--policy");
}

}  // namespace

void validate(const simulate_config& c) {
  if (c.ranks < 2 || c.ranks > 64) fail(errc::invalid_argument, "--ranks: must be in 2..64, got {}", c.ranks);
  const auto p = preset_for(c);
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
  check_backend_and_device(c);
}

std::string resolved_backend(const simulate_config& c) {
  if (c.backend != "auto") return c.backend;
  if (!c.procs && c.device == device::backend_kind::host) return "loopback";
  return c.use_async ? "gloo" : (c.device == device::backend_kind::cuda ? "nccl" : "gloo");
}

json simulate_rank(const simulate_config& cfg, int rank, std::shared_ptr<comm::store> store, bool print_progress) {
  return run_rank(cfg, rank, std::move(store), nullptr, print_progress);  // its own process: no loopback
}

namespace {

// Ranks as threads of this process, meeting on one memory store and one loopback world.
std::vector<json> run_rank_threads(const simulate_config& cfg, bool print_progress) {
  auto store = comm::make_memory_store();
  auto worlds = std::make_shared<loopback_worlds>(cfg.ranks);
  std::vector<std::future<json>> futures;
  for (int r = 0; r < worker_count(cfg); ++r) {
    futures.push_back(
        std::async(std::launch::async, [&, r] { return run_rank(cfg, r, store, worlds, print_progress); }));
  }
  std::vector<json> ranks;
  for (auto& f : futures) ranks.push_back(f.get());
  return ranks;
}

// Rank r's report as its process wrote it, or one saying why there is none; with its exit status.
json process_report(const rank_process& p, int r) {
  json doc = json::parse(p.result, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) {
    doc = {{"rank", r},
           {"verified", false},
           {"failure", p.killed ? fmt::format("rank {}: did not finish in time (killed)", r)
                                : fmt::format("rank {}: exited with status {} without a report", r, p.exit_status)}};
  } else if (p.exit_status != 0 && doc.value("failure", std::string()).empty()) {
    // Its report says all went well, yet the process failed after writing it (a crash at exit).
    doc["failure"] = fmt::format("rank {}: exited with status {} after its report", r, p.exit_status);
  }
  doc["exit_status"] = p.exit_status;
  return doc;
}

// Ranks as processes of `self_exe` (--procs), each writing its report into a file.
std::vector<json> run_rank_procs(const simulate_config& cfg, const std::string& self_exe,
                                 const std::vector<std::string>& child_args) {
  const auto deadline = deadline_after(std::chrono::hours(1));
  // A rank that is stopped (SIGSTOP) or wedged never exits: once another rank failed, it gets
  // twice the timeout, then it is killed.
  std::vector<json> ranks;
  for (const auto& p :
       run_rank_processes(self_exe, child_args, worker_count(cfg), deadline, 2 * cfg.timeout + std::chrono::seconds(2),
                          cfg.survive ? cfg.fail_rank : -1)) {
    const int r = static_cast<int>(ranks.size());
    ranks.push_back(process_report(p, r));
    if (cfg.survive && r == cfg.fail_rank &&
        ranks.back().value("failure", std::string()).find("without a report") != std::string::npos) {
      // It killed itself on purpose (--survive): a death, as a thread's.
      ranks.back()["failure"] = fmt::format("rank {}: died at step {} (injected)", r, cfg.fail_step);
      ranks.back()["died"] = true;
    }
  }
  return ranks;
}

}  // namespace

json run_simulation(const simulate_config& cfg, const std::string& self_exe, const std::vector<std::string>& child_args,
                    bool print_progress) {
  validate(cfg);
  const auto ranks = cfg.procs ? run_rank_procs(cfg, self_exe, child_args) : run_rank_threads(cfg, print_progress);
  return merge_reports(cfg, ranks);
}

}  // namespace eplb::tools

// The `eplb` command: offline planning now; simulate, exchange, info and bench join as they land.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>

#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/device/device.hpp"
#include "eplb/error.hpp"
#include "eplb/versions.hpp"
#include "eplb_build_config.hpp"
#include "tools/exchange.hpp"
#include "tools/plan_json.hpp"
#include "tools/rank_processes.hpp"
#include "tools/report/html.hpp"
#include "tools/simulate.hpp"
#include "util/fail.hpp"
#include "util/json_text.hpp"

namespace {

// Exit statuses: 0 ok, 1 runtime failure, 2 bad input.
constexpr int exit_bad_input = 2;

// Output that could not be written (stdout on a full disk, an unwritable --result): the run's
// result is lost, so it is a failure (exit 1), never a silent exit 0.
class write_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::string errno_text(int err) {
  return err != 0 ? fmt::format(" ({})", std::strerror(err)) : std::string();
}

// Flushes `out` and throws write_error naming `what` (a path, or "stdout") if anything written to
// it was lost; a stream keeps its failure bit from the first failed write on.
void check_written(std::ostream& out, const std::string& what) {
  errno = 0;
  out.flush();
  if (!out) throw write_error(fmt::format("{}: write failed{}; output lost", what, errno_text(errno)));
}

// --result FILE (or --report, --jsonl), opened before the run so that an unwritable path is a bad
// input found at once, not a finished run whose result is lost. Empty when no path is given.
std::unique_ptr<std::ofstream> open_output(const char* flag, const std::string& path) {
  if (path.empty()) return nullptr;
  errno = 0;
  auto out = std::make_unique<std::ofstream>(path, std::ios::trunc);
  if (!*out) {
    throw eplb::error(eplb::errc::invalid_argument,
                      fmt::format("{} {}: cannot open for writing{}", flag, eplb::excerpt(path), errno_text(errno)));
  }
  return out;
}

std::unique_ptr<std::ofstream> open_result(const std::string& path) {
  return open_output("--result", path);
}

// CLI11 reads "-1" into an unsigned option as 2^64 - 1: options that take no sign refuse one.
const CLI::Validator no_sign(
    [](std::string& text) -> std::string {
      const auto first = text.find_first_not_of(" \t");
      if (first == std::string::npos || (text[first] != '-' && text[first] != '+')) return {};
      return fmt::format("must be a whole number >= 0, got {}", eplb::excerpt(text));
    },
    "UINT", "no_sign");

std::string read_input(const std::string& path) {
  std::ostringstream text;
  if (path == "-") {
    text << std::cin.rdbuf();
    return text.str();
  }
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw eplb::error(eplb::errc::invalid_argument,
                      fmt::format("{}: cannot open for reading", eplb::excerpt(path, 200)));
  }
  text << file.rdbuf();
  return text.str();
}

int run_plan(const std::string& path, bool text) {
  const auto request = eplb::tools::parse_plan_text(read_input(path));
  const auto result = eplb::tools::run_plan(request);
  if (text) {
    std::cout << eplb::tools::to_text(request, result);
  } else {
    std::cout << eplb::tools::to_json(result).dump() << '\n';
  }
  return 0;
}

// `eplb info --json`: the same facts as one JSON object.
int run_info_json() {
  const int gpus = eplb::device::cuda_device_count();
  nlohmann::json out{{"version", EPLB_VERSION}};
  out["devices"] = nlohmann::json::array({
      {{"kind", "host"}, {"built", true}, {"runnable", true}},
      {{"kind", "cuda"}, {"built", EPLB_HAVE_CUDA != 0}, {"runnable", gpus > 0}, {"gpus", gpus}},
  });
  out["components"] = nlohmann::json::array();
  for (const auto& c : eplb::component_versions()) {
    out["components"].push_back({{"name", c.name}, {"version", c.version}, {"note", c.note}});
  }
  out["communicators"] = nlohmann::json::array();
  for (const auto& b : eplb::comm::backend_report()) {
    out["communicators"].push_back(
        {{"kind", eplb::comm::to_string(b.kind)}, {"built", b.built}, {"runnable", b.runnable}, {"reason", b.reason}});
  }
  std::cout << out.dump() << '\n';
  return 0;
}

int run_info(bool json) {
  if (json) return run_info_json();
  std::cout << fmt::format("eplb {}\nversions:\n", EPLB_VERSION);
  for (const auto& c : eplb::component_versions()) {
    if (c.name == "eplb") continue;
    std::cout << fmt::format("  {:<16} {}\n", c.name, c.version.empty() ? "- (" + c.note + ")" : c.version);
  }
  const int gpus = eplb::device::cuda_device_count();
  std::cout << fmt::format("devices:\n  {:<16} built, runnable\n", "host");
  std::cout << fmt::format("  {:<16} {}, {}\n", "cuda", EPLB_HAVE_CUDA ? "built" : "not built",
                           gpus > 0 ? fmt::format("runnable ({} GPU(s))", gpus) : std::string("not runnable (no GPU)"));
  std::cout << "communicators:\n";
  for (const auto& b : eplb::comm::backend_report()) {
    std::cout << fmt::format("  {:<16} {}, {}{}\n", eplb::comm::to_string(b.kind), b.built ? "built" : "not built",
                             b.runnable ? "runnable" : "not runnable", b.reason.empty() ? "" : " (" + b.reason + ")");
  }
  return 0;
}

std::vector<std::size_t> parse_sizes(const std::string& text) {
  std::vector<std::size_t> out;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) {
    try {
      // stoull would read "-1" as 2^64 - 1 and skip leading spaces: only digits are a byte count.
      if (part.empty() || part.find_first_not_of("0123456789") != std::string::npos) throw std::invalid_argument(part);
      out.push_back(std::stoull(part));
    } catch (const std::exception&) {
      throw eplb::error(eplb::errc::invalid_argument,
                        fmt::format("--tensor-bytes: \"{}\" is not a byte count", eplb::excerpt(part)));
    }
  }
  return out;
}

struct exchange_flags {
  eplb::tools::exchange_config cfg;
  std::string tensor_bytes = "4096,1024", backend = "loopback", device = "host", store, result, hostname = "127.0.0.1";
  int rank = -1;
  long timeout_ms = 30000;
  long delay_ms = 0;
  long fail_op = -1;
  bool json = false;
};

// One rank of a multi-process exchange: started by the parent `eplb exchange`, or by hand with
// --rank (one per host, meeting through a TCP store).
int run_exchange_child(const exchange_flags& f) {
  using namespace eplb;
  const auto& cfg = f.cfg;
  const auto result_file = open_result(f.result);
  tools::exchange_result res;
  std::unique_ptr<tools::rank_store> store;
  try {
    store = std::make_unique<tools::rank_store>(f.store, cfg.ranks, f.rank, cfg.timeout);
    const bool faulty = cfg.fault_rank < 0 || cfg.fault_rank == f.rank;
    auto dev = cfg.device == device::backend_kind::cuda
                   ? device::make_cuda_device(f.rank % std::max(1, device::cuda_device_count()))
                   : device::make_host_device(faulty ? cfg.faults : device::host_faults{});
    comm::setup s;
    s.rank = f.rank;
    s.size = cfg.ranks;
    s.rendezvous = store->get();
    s.dev = dev.get();
    s.opts.timeout = cfg.timeout;
    s.opts.hostname = f.hostname;
    auto c = comm::make_communicator(cfg.backend, s);
    res = tools::run_exchange_rank(cfg, f.rank, *c, *dev);
  } catch (const error& e) {
    res.failure = fmt::format("rank {}: [{}] {}", f.rank, to_string(e.code()), e.what());
  }
  if (result_file) {
    *result_file << (res.verified ? 1 : 0) << ' ' << res.rounds << ' ' << res.bytes_moved << ' ' << res.seconds << '\n'
                 << res.failure << '\n';
    check_written(*result_file, "--result " + excerpt(f.result));
  } else {
    std::cout << fmt::format("rank {}: {} rounds, {} bytes received in {:.3f} s, {}\n", f.rank, res.rounds,
                             res.bytes_moved, res.seconds, res.verified ? "every byte verified" : "FAILED");
    if (!res.failure.empty()) std::cout << "  " << res.failure << '\n';
  }
  if (res.verified) store->finish();
  return res.verified ? 0 : 1;
}

int run_exchange(exchange_flags& f, const std::vector<std::string>& child_args) {
  using namespace eplb;
  auto& cfg = f.cfg;
  cfg.tensor_bytes = parse_sizes(f.tensor_bytes);
  cfg.backend = comm::parse_backend(f.backend);
  cfg.device = device::parse_backend_kind(f.device);
  cfg.timeout = std::chrono::milliseconds(f.timeout_ms);
  cfg.faults.max_delay = std::chrono::milliseconds(f.delay_ms);
  cfg.faults.fail_at_op = f.fail_op;
  cfg.faults.seed = cfg.seed;
  tools::validate(cfg);
  if (f.rank < -1 || f.rank >= cfg.ranks) {
    throw error(errc::invalid_argument, fmt::format("--rank: {} is not a rank (0..{})", f.rank, cfg.ranks - 1));
  }
  if (f.rank >= 0) return run_exchange_child(f);
  const auto res = tools::run_exchange(cfg, "/proc/self/exe", child_args);
  // All ranks' received bytes over the wall time of the rounds.
  const double gbps = res.seconds > 0 ? static_cast<double>(res.bytes_moved) / res.seconds / 1e9 : 0.0;
  if (f.json) {
    nlohmann::json out = {{"verified", res.verified}, {"rounds", res.rounds}, {"bytes_moved", res.bytes_moved},
                          {"seconds", res.seconds},   {"gbps", gbps},         {"ranks", cfg.ranks},
                          {"backend", f.backend}};
    if (!res.failure.empty()) out["failure"] = res.failure;
    std::cout << out.dump() << '\n';
  } else {
    std::cout << fmt::format(
        "{} ranks over {}, {} layers x {} slots, {} rounds: {} bytes moved in {:.3f} s ({:.3f} GB/s, all ranks), {}\n",
        cfg.ranks, f.backend, cfg.layers, cfg.experts + cfg.redundant, res.rounds, res.bytes_moved, res.seconds, gbps,
        res.verified ? "every byte verified" : "FAILED");
    if (!res.failure.empty()) std::cout << "  " << res.failure << '\n';
  }
  return res.verified ? 0 : 1;
}

struct simulate_flags {
  eplb::tools::simulate_config cfg;
  std::string device = "host", store, result, scale;
  bool sync = false, async = false, json = false;
  int rank = -1;
  long timeout_ms = 10000, delay_ms = 0, forward_us = 200;
};

int run_simulate(simulate_flags& f, const std::vector<std::string>& child_args) {
  using namespace eplb;
  auto& cfg = f.cfg;
  if (f.sync && f.async) throw error(errc::invalid_argument, "--sync and --async exclude each other");
  cfg.use_async = !f.sync;
  cfg.device = device::parse_backend_kind(f.device);
  cfg.timeout = std::chrono::milliseconds(f.timeout_ms);
  cfg.inject_delay = std::chrono::milliseconds(f.delay_ms);
  cfg.forward = std::chrono::microseconds(f.forward_us);
  if (!f.scale.empty()) cfg.scale = tools::parse_scale(f.scale);
  tools::validate(cfg);
  const int workers = tools::worker_count(cfg);  // --scale: joining ranks are more workers
  if (f.rank < -1 || f.rank >= workers) {
    throw error(errc::invalid_argument, fmt::format("--rank: {} is not a rank (0..{})", f.rank, workers - 1));
  }
  if (f.rank >= 0) {  // one rank of a --procs run, or started by hand (one per host)
    const auto result_file = open_result(f.result);
    tools::rank_store store(f.store, workers, f.rank, cfg.timeout);
    const auto report = tools::simulate_rank(cfg, f.rank, store.get(), !f.json);
    if (result_file) {
      *result_file << report.dump();
      check_written(*result_file, "--result " + excerpt(f.result));
    } else {
      std::cout << report.dump() << '\n';
    }
    const bool verified = report.value("verified", false);
    if (verified) store.finish();
    return verified ? 0 : 1;
  }
  // Opened (and emptied) before any rank starts: an unwritable path is bad input found at once.
  const auto html = open_output("--report", cfg.report_path);
  (void)open_output("--jsonl", cfg.jsonl_path);
  const auto report = tools::run_simulation(cfg, "/proc/self/exe", child_args, !f.json);
  if (html) {
    *html << tools::html_report(cfg, report);
    check_written(*html, "--report " + excerpt(cfg.report_path));
  }
  if (f.json) {
    std::cout << report.dump() << '\n';
  } else {
    std::cout << tools::summary_table(cfg, report);
  }
  return report.value("verified", false) && report.value("commit_steps_consistent", false) &&
                 !report.contains("failure")
             ? 0
             : 1;
}

bool is_bad_input(eplb::errc code) {
  using eplb::errc;
  return code == errc::invalid_argument || code == errc::invalid_json || code == errc::invalid_map ||
         code == errc::invalid_config;
}

// Parses the command line; an exit status when the run ends here. CLI11's own statuses (104, 109,
// 114...) are not the documented 2 for bad input, and its messages may span lines or echo a long
// value: one line, the value cut to an excerpt.
std::optional<int> parse_flags(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
    return std::nullopt;
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    std::cerr << "eplb: " << eplb::excerpt(what, 200) << " (run with --help for more information)\n";
    return exit_bad_input;
  }
}

// `eplb plan FILE [--text]`.
struct plan_flags {
  std::string path;
  bool text = false;
};

CLI::App* add_plan_command(CLI::App& app, plan_flags& f) {
  auto* plan = app.add_subcommand("plan", "Compute a placement from a JSON load description (offline)");
  plan->add_option("file", f.path, "JSON request, or - for stdin")->required();
  plan->add_flag("--text", f.text, "Print a readable per-rank table instead of JSON");
  return plan;
}

CLI::App* add_exchange_command(CLI::App& app, exchange_flags& ex) {
  auto* exchange =
      app.add_subcommand("exchange", "Rearrange a random model with recognisable bytes and verify every byte");
  exchange->add_option("--ranks", ex.cfg.ranks, "EP ranks (threads for loopback, processes otherwise)");
  exchange->add_option("--layers", ex.cfg.layers, "MoE layers");
  exchange->add_option("--experts", ex.cfg.experts, "logical experts per layer");
  exchange->add_option("--redundant", ex.cfg.redundant, "extra physical slots per layer");
  exchange->add_option("--tensor-bytes", ex.tensor_bytes, "bytes per expert of each bundle tensor, comma separated");
  exchange->add_option("--backend", ex.backend, "loopback | gloo | nccl | stateless_nccl | cuda_ipc");
  exchange->add_option("--device", ex.device, "host | cuda");
  exchange->add_option("--seed", ex.cfg.seed, "random placements and bytes")->check(no_sign);
  exchange->add_option("--rounds", ex.cfg.rounds, "rearrangements, each to a new random placement");
  exchange->add_option("--staging-bytes", ex.cfg.staging_bytes, "staging cap (0 = one layer)")->check(no_sign);
  exchange->add_flag("!--no-coalesce", ex.cfg.coalesce, "one message per tensor of every expert, not per peer");
  exchange->add_flag("--register", ex.cfg.register_buffers,
                     "register the staging buffers with the communicator (nccl: zero-copy over NVLink)");
  exchange->add_option("--timeout-ms", ex.timeout_ms, "every wait of a transfer, 1..86400000");
  exchange->add_option("--inject-delay-ms", ex.delay_ms, "host device: random delay up to this per stream operation");
  exchange->add_option("--inject-fail-op", ex.fail_op, "host device: the Nth stream operation fails");
  exchange->add_option("--fault-rank", ex.cfg.fault_rank, "the rank whose device gets the injected faults");
  exchange->add_flag("--json", ex.json, "print one JSON object");
  exchange->add_option("--rank", ex.rank,
                       "run only this rank (one process per rank, e.g. one per host; needs --store)");
  exchange->add_option("--store", ex.store,
                       "with --rank: DIR (file store), tcp:HOST:PORT, or tcp-serve:HOST:PORT (serve it)");
  exchange->add_option("--hostname", ex.hostname, "gloo: the address this rank listens on (default 127.0.0.1)");
  exchange->add_option("--result", ex.result, "with --rank: write the result here instead of printing it");
  return exchange;
}

// The flags that shape the simulated run: model, ranks, steps, mode, load and timing.
void add_simulate_run_flags(CLI::App& simulate, simulate_flags& sim) {
  simulate.add_option("--preset", sim.cfg.preset, "tiny | qwen3-30b-a3b | deepseek-v3");
  simulate.add_option("--policy", sim.cfg.policy, "default | min_move (the placement policy)");
  simulate.add_option("--ranks", sim.cfg.ranks, "EP ranks, 2..64 (a preset's redundant slots grow to divide)");
  simulate.add_flag("--procs", sim.cfg.procs, "ranks as processes (default: threads)");
  simulate.add_option("--steps", sim.cfg.steps, "forward steps every rank runs");
  simulate.add_flag("--async", sim.async, "stage on a background thread, commit at step boundaries (default)");
  simulate.add_flag("--sync", sim.sync, "rearrange inside step()");
  simulate.add_option("--backend", sim.cfg.backend, "auto | loopback | gloo | nccl | stateless_nccl | cuda_ipc");
  simulate.add_option("--device", sim.device, "host | cuda");
  simulate.add_option("--seed", sim.cfg.seed, "the load's random stream")->check(no_sign);
  simulate.add_option("--step-interval", sim.cfg.step_interval, "steps between rebalances (0: the preset's)");
  simulate.add_option("--commit-lag", sim.cfg.commit_lag,
                      "async: steps between agreeing on staged layers and "
                      "committing them (default: the config's, 8)");
  simulate.add_option("--window", sim.cfg.window, "load window in steps (0: the preset's)");
  simulate
      .add_option("--bytes-scale", sim.cfg.bytes_scale, "divide expert sizes by this (0: 1024 on host for big presets)")
      ->check(no_sign);
  simulate.add_option("--tokens", sim.cfg.tokens_per_step, "routed token slots per rank, layer and step");
  simulate.add_option("--drift-steps", sim.cfg.drift_steps, "the hot experts move this often");
  simulate.add_option("--timeout-ms", sim.timeout_ms, "every wait of a rebalance, 1..86400000");
  simulate.add_option("--forward-us", sim.forward_us, "time each step spends in the forward-pass stand-in");
}

// The injected faults, the output and a rank run on its own.
void add_simulate_fault_and_rank_flags(CLI::App& simulate, simulate_flags& sim) {
  simulate.add_option("--inject-delay-ms", sim.delay_ms, "random delays up to this on host streams");
  simulate.add_option("--fail-rank", sim.cfg.fail_rank, "this rank dies at --fail-step");
  simulate.add_option("--fail-step", sim.cfg.fail_step, "the step at which --fail-rank dies");
  simulate.add_option("--scale", sim.scale,
                      "STEP:SIZE,...: the rank set shrinks (highest ranks leave) or grows (ranks join) at those steps");
  simulate.add_flag("--survive", sim.cfg.survive,
                    "with --fail-rank: the others agree on the live set, reload the experts lost with it and serve on");
  simulate.add_flag("--no-reload", sim.cfg.no_reload,
                    "with --survive: no checkpoint to reload from; the experts lost with the rank are masked");
  simulate.add_option("--stop-rank", sim.cfg.stop_rank, "this rank calls stop() at --stop-step and leaves");
  simulate.add_option("--stop-step", sim.cfg.stop_step, "the step at which --stop-rank stops");
  simulate.add_option("--transfer-fault-rank", sim.cfg.transfer_fault_rank,
                      "this rank's first batch after --transfer-fault-step fails once; the run goes on");
  simulate.add_option("--transfer-fault-step", sim.cfg.transfer_fault_step, "the step after which the fault is armed");
  simulate.add_flag("--json", sim.json, "print one JSON object");
  simulate.add_option(
      "--report", sim.cfg.report_path,
      "write a self-contained HTML page with plots of the run (balancedness, loads, bytes, step times)");
  simulate.add_option("--jsonl", sim.cfg.jsonl_path, "append one JSON line per step and per rebalance of every rank");
  simulate.add_option("--rank", sim.rank, "run only this rank (with --procs; one process per rank, needs --store)");
  simulate.add_option("--store", sim.store, "with --rank: DIR (file store), tcp:HOST:PORT, or tcp-serve:HOST:PORT");
  simulate.add_option("--hostname", sim.cfg.hostname, "gloo: the address this rank listens on (default 127.0.0.1)");
  simulate.add_option("--result", sim.result, "with --rank: write the JSON report here instead of printing it");
}

CLI::App* add_simulate_command(CLI::App& app, simulate_flags& sim) {
  auto* simulate =
      app.add_subcommand("simulate", "Run a miniature serving loop with drifting skewed load and rebalances");
  add_simulate_run_flags(*simulate, sim);
  add_simulate_fault_and_rank_flags(*simulate, sim);
  return simulate;
}

// Runs a parsed command and turns what it throws into a message on stderr (one line whatever a
// message echoes: a flag's value may hold a newline) and an exit status: 2 for bad input, else 1.
int run_reporting_errors(const std::function<int()>& command) {
  try {
    const int status = command();
    check_written(std::cout, "stdout");
    return status;
  } catch (const write_error& e) {
    std::cerr << "eplb: " << e.what() << '\n';
    return 1;
  } catch (const eplb::error& e) {
    std::cerr << "eplb: " << eplb::excerpt(e.what(), 2000) << '\n';
    return is_bad_input(e.code()) ? exit_bad_input : 1;
  } catch (const std::exception& e) {
    std::cerr << "eplb: unexpected error: " << eplb::excerpt(e.what(), 2000) << '\n';
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eplb: expert-parallel load balancing for MoE serving"};
  app.option_defaults()->always_capture_default();  // help shows every option's default
  app.set_version_flag("--version", fmt::format("eplb {}", EPLB_VERSION), "Print the version and exit");
  app.require_subcommand(1);
  plan_flags pl;
  exchange_flags ex;
  simulate_flags sim;
  auto* plan = add_plan_command(app, pl);
  auto* info = app.add_subcommand("info", "Show which device and communicator backends were built and can run here");
  bool info_json = false;
  info->add_flag("--json", info_json, "Print one JSON object (versions, devices, communicators)");
  auto* exchange = add_exchange_command(app, ex);
  auto* simulate = add_simulate_command(app, sim);
  if (const auto status = parse_flags(app, argc, argv)) return *status;
  return run_reporting_errors([&] {
    const std::vector<std::string> child_args(argv + 1, argv + argc);
    int status = 0;
    if (plan->parsed()) status = run_plan(pl.path, pl.text);
    if (info->parsed()) status = run_info(info_json);
    if (simulate->parsed()) status = run_simulate(sim, child_args);
    if (exchange->parsed()) status = run_exchange(ex, child_args);
    return status;
  });
}

// `eplb simulate`: a serving loop in miniature. N ranks each own an EplbState and a model whose
// slots hold recognisable bytes; tokens are routed by a skewed (Zipf) load whose hot experts drift;
// rebalances run (sync or async) and every committed layer is verified.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/device/device.hpp"

namespace eplb::tools {

struct simulate_config {
  std::string preset = "tiny";
  std::string policy = "default";  ///< the placement policy: default | min_move
  int ranks = 4;
  int steps = 2000;
  bool use_async = true;
  std::string backend = "auto";
  device::backend_kind device = device::backend_kind::host;
  std::uint64_t seed = 1;
  int step_interval = 0;        ///< 0: the preset's
  int commit_lag = -1;          ///< async agreement lag in steps; -1: eplb's default
  int window = 0;               ///< 0: the preset's
  std::size_t bytes_scale = 0;  ///< divide bundle sizes by this (0: the preset's default for the device)
  int tokens_per_step = 256;    ///< routed token slots per rank and layer per step
  double zipf = 1.2;
  int drift_steps = 500;                   ///< hot experts move this often
  std::chrono::microseconds forward{200};  ///< each step also "runs the model" this long (a sleep)
  std::chrono::milliseconds inject_delay{0};
  int fail_rank = -1;
  int fail_step = -1;
  /// With fail_rank: the others recover() without it (eplb_state::recover) and serve on; experts
  /// only the dead rank held are loaded back from the simulator's checkpoint (reload_expert).
  bool survive = false;
  /// With survive: no reload_expert hook, so the experts lost with the rank are masked (the router
  /// sends no token to them, as an engine masks their logits).
  bool no_reload = false;
  /// --scale STEP:SIZE,...: the rank set changes before those steps (eplb_state::rescale). When it
  /// shrinks the highest ranks leave; when it grows new ranks join (more workers: threads or
  /// processes that wait for their step, then construct their state with join_epoch).
  std::vector<std::pair<int, int>> scale;
  /// This rank calls eplb_state::stop() at the step (whatever is in flight) and leaves the run; its
  /// peers are told. Every rank's report carries how long its stop() took (stop_ms).
  int stop_rank = -1;
  int stop_step = -1;
  /// This rank's first batch after the step fails (the communicator then stays broken, as real ones
  /// do); every rank reports the error and goes on, and later rebalances run on new communicators.
  int transfer_fault_rank = -1;
  int transfer_fault_step = -1;
  std::chrono::milliseconds timeout{10'000};
  bool procs = false;
  std::string hostname = "127.0.0.1";  ///< gloo: the address this rank listens on
  std::string report_path;             ///< --report: a self-contained HTML page of the run
  std::string jsonl_path;              ///< --jsonl: per-step and per-rebalance records, one per line
};

/// A worker's part in a --scale run: workers 0..ranks-1 start as those ranks; each growth adds
/// workers for its new ranks, in order.
struct scale_role {
  int join_event = -1;  ///< the --scale event it joins at; -1: in the first set
  int rank = 0;         ///< its rank (ranks keep their number: leaving ranks are the highest)
  int start_step = 0;   ///< steps served before it starts (a joiner: its event's step - 1)
  int set_size = 0;     ///< ranks in the set it starts in
};
[[nodiscard]] int worker_count(const simulate_config& cfg);
[[nodiscard]] scale_role role_of(const simulate_config& cfg, int worker);
/// Parses --scale's "STEP:SIZE,..." (errc::invalid_argument naming --scale).
[[nodiscard]] std::vector<std::pair<int, int>> parse_scale(const std::string& text);

struct preset_shape {
  int layers, experts, redundant, groups, nodes;
  std::vector<std::size_t> tensor_bytes;
  int step_interval, window;
};

/// The presets: tiny (default, seconds on 2 cores), qwen3-30b-a3b, deepseek-v3. error(errc::invalid_argument)
/// listing them for an unknown name.
[[nodiscard]] preset_shape find_preset(const std::string& name);

/// The preset fitted to the run's rank count: its redundant slots grow until every rank holds as
/// many slots, and its nodes shrink to a count that divides the ranks and the groups. adjustment()
/// says what changed ("" when nothing did).
[[nodiscard]] preset_shape preset_for(const simulate_config& cfg);
[[nodiscard]] std::string adjustment(const simulate_config& cfg);

/// Checks flags and combinations, before any rank starts: numbers, the backend (known, built,
/// runnable here, allowed in the mode) and the device (a GPU for cuda). error(errc::invalid_argument
/// or invalid_config) naming the flag.
void validate(const simulate_config& cfg);

/// The communicator backend a run uses: --backend, or for "auto" loopback (threads on the host
/// device), else gloo, or nccl for sync runs on cuda.
[[nodiscard]] std::string resolved_backend(const simulate_config& cfg);

/// One rank's run; returns its report as JSON (also what a child process writes).
[[nodiscard]] nlohmann::json simulate_rank(const simulate_config& cfg, int rank, std::shared_ptr<comm::store> store,
                                           bool print_progress);

/// Merges the ranks' reports (simulate_rank's) into the run's: "verified" when every surviving rank
/// verified its live slots, "failure" when any rank failed or ranks committed in different steps,
/// "failures" listing every error a rank reported (also those the run went on after).
[[nodiscard]] nlohmann::json merge_reports(const simulate_config& cfg, const std::vector<nlohmann::json>& ranks);

/// Runs every rank (threads, or processes of `self_exe` with --procs) and merges the reports.
[[nodiscard]] nlohmann::json run_simulation(const simulate_config& cfg, const std::string& self_exe,
                                            const std::vector<std::string>& child_args, bool print_progress);

/// The readable summary of a merged report.
[[nodiscard]] std::string summary_table(const simulate_config& cfg, const nlohmann::json& report);

}  // namespace eplb::tools

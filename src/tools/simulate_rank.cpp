#include "tools/simulate_rank.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <csignal>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <numeric>
#include <random>
#include <thread>

#include "eplb/config.hpp"
#include "eplb/state.hpp"
#include "tools/alloc_counter.hpp"
#include "tools/exchange.hpp"
#include "tools/faulty_comm.hpp"
#include "tools/simulate_router.hpp"
#include "tools/simulate_trace.hpp"
#include "util/fail.hpp"

namespace eplb::tools {
namespace {

using nlohmann::json;
using clock_type = std::chrono::steady_clock;

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
  // On stderr, so that stdout holds the summary (or the JSON) alone.
  progress(bool enabled, int steps) : enabled_(enabled), tty_(enabled && ::isatty(STDERR_FILENO)), steps_(steps) {}
  void update(int step, const metrics& m, bool force) {
    if (!enabled_) return;
    const int every = tty_ ? std::max(1, steps_ / 200) : std::max(1, steps_ / 10);
    if (!force && step % every != 0) return;
    const std::string state = m.rebalance_in_flight ? "rebalancing" : "serving";
    // Balancedness is known once a rebalance has measured it.
    const auto balance = m.balancedness_after > 0 ? fmt::format("{:.3f}", m.balancedness_after) : std::string("-");
    if (tty_) {
      const int width = 30;
      const int filled = width * step / steps_;
      std::cerr << fmt::format("\r[{}{}] step {}/{}  balancedness {:<5}  rebalances {}  {:<12}",
                               std::string(filled, '#'), std::string(width - filled, '.'), step, steps_, balance,
                               m.rebalances, state)
                << std::flush;
      if (step == steps_) std::cerr << '\n';
    } else {
      std::cerr << fmt::format("step {}/{}: balancedness {}, rebalances {}, {}\n", step, steps_, balance, m.rebalances,
                               state)
                << std::flush;
    }
  }

 private:
  bool enabled_, tty_;
  int steps_;
};

// The preset's model with its bundle sizes divided by bytes_scale (by default 1024 for the big
// presets on the host device, whose memory is the host's).
// `ranks`: the set the rank starts in (--scale: a joining rank's), with as many slots per rank.
exchange_config rank_shape(const simulate_config& cfg, const preset_shape& p, int ranks) {
  const bool cuda = cfg.device == device::backend_kind::cuda;
  const std::size_t scale = cfg.bytes_scale != 0 ? cfg.bytes_scale : (cuda || cfg.preset == "tiny" ? 1 : 1024);
  const int per_rank = (p.experts + p.redundant) / cfg.ranks;
  exchange_config shape{.ranks = ranks,
                        .layers = p.layers,
                        .experts = p.experts,
                        .redundant = ranks * per_rank - p.experts,
                        .device = cfg.device};
  shape.tensor_bytes.clear();
  for (auto b : p.tensor_bytes) shape.tensor_bytes.push_back(std::max<std::size_t>(1, b / scale));
  return shape;
}

// A GPU per rank (round robin over those present), or a host device with the injected delays.
std::unique_ptr<device::device> make_rank_device(const simulate_config& cfg, int rank) {
  if (cfg.device == device::backend_kind::cuda) {
    return device::make_cuda_device(rank % std::max(1, device::cuda_device_count()));
  }
  return device::make_host_device({.max_delay = cfg.inject_delay, .seed = cfg.seed + static_cast<unsigned>(rank)});
}

// Slots filled with recognisable bytes for the run's starting placement; a joining rank's hold no
// expert's bytes until the rearrangement that fills them.
pattern_model start_model(const simulate_config& cfg, const preset_shape& p, const scale_role& role,
                          device::device& dev, device::stream& stream) {
  const auto shape = rank_shape(cfg, p, role.set_size);
  const int rank = role.rank;
  const auto start_map = role.join_event >= 0
                             ? matrix<expert_id>(static_cast<std::size_t>(shape.layers),
                                                 static_cast<std::size_t>(shape.experts + shape.redundant), empty_slot)
                             : round_placement(shape, 0, {});
  return pattern_model(pattern_shape(shape), rank, dev, stream, start_map, cfg.timeout);
}

// One rank's serving setup: its device and serving stream, a model whose slots hold recognisable
// bytes, and the eplb_state that rebalances it (declared last, so destroyed first: it uses the rest).
struct rank_context {
  rank_context(const simulate_config& cfg, preset_shape preset, const scale_role& role, std::int64_t join_epoch,
               std::shared_ptr<comm::store> store, std::shared_ptr<loopback_worlds> worlds);
  [[nodiscard]] bool transfer_fault() const { return cfg.transfer_fault_rank >= 0; }

  const simulate_config& cfg;
  const preset_shape preset;
  const scale_role role;
  const int rank;                 // the rank it started as (state.rank() is the current one)
  const std::int64_t join_epoch;  // --scale, a joining rank: the set it joins
  const std::shared_ptr<comm::store> store;
  const std::shared_ptr<loopback_worlds> worlds;      // threads only
  const std::shared_ptr<comm::loopback_world> world;  // of the set it starts in
  const std::unique_ptr<device::device> dev;
  // Every allocation on the device, counted (the engine's allocator, as it would see eplb's).
  const std::shared_ptr<alloc_counter> allocations;
  const std::unique_ptr<device::stream> stream;
  pattern_model model;
  const std::shared_ptr<fault_switch> faults = std::make_shared<fault_switch>();
  eplb_state state;
};

// With an injected transfer fault, the state's communicators are wrapped: it makes them itself
// (and again after a failure), so the fault breaks the same communicator the state would use.
void wrap_communicators(state_params& sp, const rank_context& c) {
  if (!c.transfer_fault()) return;
  sp.comm_wrap = [faults = c.faults, mine = c.rank == c.cfg.transfer_fault_rank](
                     std::unique_ptr<comm::communicator> inner, int) -> std::unique_ptr<comm::communicator> {
    ++faults->made;
    if (!mine) return inner;
    return std::make_unique<faulty_communicator>(std::move(inner), faults);
  };
}

// The state's parameters: the preset's model and intervals unless the flags override them.
state_params state_params_for(rank_context& c) {
  const auto& cfg = c.cfg;
  const auto& p = c.preset;
  state_params sp;
  sp.cfg.window_size = cfg.window != 0 ? cfg.window : p.window;
  sp.cfg.step_interval = cfg.step_interval != 0 ? cfg.step_interval : p.step_interval;
  if (cfg.commit_lag >= 0) sp.cfg.commit_lag_steps = cfg.commit_lag;
  sp.cfg.num_redundant_experts = c.model.shape().num_physical - p.experts;
  sp.cfg.use_async = cfg.use_async;
  sp.cfg.communicator = resolved_backend(cfg);
  sp.cfg.policy = cfg.policy;
  sp.cfg.timeout = cfg.timeout;
  sp.cfg.reserve_memory = true;  // as an engine's profile run would: rebalances then allocate nothing
  sp.model = {c.model.shape(), p.groups, p.nodes};
  const int ranks = c.role.set_size;
  if (ranks % std::max(1, p.nodes) != 0) sp.model.num_nodes = 1;
  sp.model.shape.ranks_per_node = ranks / std::max(1, sp.model.num_nodes);
  sp.join_epoch = c.join_epoch;
  sp.rank = c.rank;
  sp.dev = c.dev.get();
  sp.serving_stream = c.stream.get();
  sp.weights = c.model.weights();
  sp.store = c.store;
  sp.comm_setup.world = c.world;
  sp.comm_setup.opts.hostname = cfg.hostname;
  sp.log = [](std::string_view) {};
  if (cfg.survive && !cfg.no_reload) {
    // The simulator's checkpoint: every expert's bytes are known (pattern_model).
    sp.reload_expert = [model = &c.model](int layer, int expert, int slot) { model->load_expert(layer, expert, slot); };
  }
  wrap_communicators(sp, c);
  return sp;
}

rank_context::rank_context(const simulate_config& cfg, preset_shape preset, const scale_role& role,
                           std::int64_t join_epoch, std::shared_ptr<comm::store> store,
                           std::shared_ptr<loopback_worlds> worlds)
    : cfg(cfg),
      preset(std::move(preset)),
      role(role),
      rank(role.rank),
      join_epoch(join_epoch),
      store(std::move(store)),
      worlds(std::move(worlds)),
      world(!this->worlds    ? nullptr
            : join_epoch > 0 ? this->worlds->of_set(join_epoch, role.set_size)
                             : this->worlds->first()),
      dev(make_rank_device(cfg, rank)),
      allocations(alloc_counter::install(*dev)),
      stream(dev->create_stream()),
      model(start_model(cfg, this->preset, role, *dev, *stream)),
      state(state_params_for(*this)) {}

// What a rank records while it serves, written into its report however its run ends: host time
// in step() (with a rebalance in flight or not), the layers committed as (rebalance, layer, step),
// the rebalances finished and the errors it served on after.
struct rank_log {
  std::vector<double> busy_us, idle_us;
  json commits = json::array(), rebalances = json::array(), errors = json::array();
  json recoveries = json::array();                  // --survive: the rank sets this rank served on in
  json rank_sets = json::array();                   // --scale: the rank sets this rank rescaled into
  int left_step = -1;                               // --scale: the step before which this rank left
  int rebalance = -1, layer = 0, trigger_step = 0;  // the rebalance whose layers commit next
  std::uint64_t bytes_seen = 0;                     // bytes_moved when the last rebalance finished
  // --report and --jsonl only: load samples, and the lines appended to the --jsonl file.
  std::unique_ptr<load_sampler> sampler;
  std::unique_ptr<jsonl_sink> sink;

  void open_trace(const simulate_config& cfg, const preset_shape& p) {
    if (!cfg.report_path.empty() || !cfg.jsonl_path.empty()) {
      sampler = std::make_unique<load_sampler>(p.layers, cfg.ranks, (p.experts + p.redundant) / cfg.ranks,
                                               sample_every(cfg.steps, p.layers, cfg.ranks));
    }
    if (!cfg.jsonl_path.empty()) sink = std::make_unique<jsonl_sink>(cfg.jsonl_path);
  }
  void record(json line) {
    if (sink) sink->write(line);
  }

  void begin_rebalance(int step) {
    ++rebalance;
    layer = 0;
    trigger_step = step;
  }
  void write_timings(json& out) const {
    out["busy_us"] = busy_us;
    out["idle_us"] = idle_us;
    out["commits"] = commits;
    out["rebalances"] = rebalances;
    out["recoveries"] = recoveries;
    out["rank_sets"] = rank_sets;
    if (sampler) out["samples"] = sampler->to_json();
  }
};

// What one step() changed: whether it started a rebalance (also when it threw), how many layers
// it committed, and (sync) the maps from before it.
struct step_change {
  bool started = false;
  int committed = 0;
  matrix<expert_id> maps_before;
};

// [[LAYER, EXPERT], ...] of the experts served without.
json masked_json(const std::vector<masked_expert>& masked) {
  json out = json::array();
  for (const auto& x : masked) out.push_back({x.layer, x.expert});
  return out;
}

// --survive: after the dead rank failed a step, the survivors agree on who they are, reload what
// only it held, and serve on as a smaller set; recorded with every live slot verified.
void recover(rank_context& c, rank_log& log) {
  recover_params p;
  if (c.worlds) p.comm_setup = [w = c.worlds](int size) { return comm::setup{.world = w->of_size(size)}; };
  const auto rep = c.state.recover(std::move(p));
  log.rebalance = static_cast<int>(c.state.stats().rebalances) - 1;  // ids go on from the survivors' agreed count
  for (int l = 0; l < c.preset.layers; ++l) {
    if (auto bad = verify_layer(c.state, c.model, l, c.state.rank()); !bad.empty())
      fail(errc::verification_failed, "after recover(): {}", bad);
  }
  // The step count every survivor goes on from (async ranks may learn of the death steps apart).
  log.recoveries.push_back({{"step", c.state.stats().steps},
                            {"rank", rep.rank},
                            {"num_ranks", rep.num_ranks},
                            {"lost_ranks", rep.lost_ranks},
                            {"experts_reloaded", rep.experts_reloaded},
                            {"masked", masked_json(rep.masked)},
                            {"replan_error", rep.fill_error},
                            {"seconds", rep.seconds},
                            {"maps_digest", maps_digest(c.state)}});
}

// state.step(). With an injected transfer fault every rank reports an error (its own, or a peer's)
// and serves on; the layers it committed in this step are still checked by the caller. With
// --survive, the first error a peer's death causes makes the survivors recover().
step_report checked_step(rank_context& c, rank_log& log, int step) {
  try {
    return c.state.step();
  } catch (const error& e) {
    // A stall past the timeout under load is recovered from too (every rank answers: the set is
    // made again); a bounded number, so that a rank failing every step still ends.
    if (c.cfg.survive && e.code() != errc::verification_failed && log.recoveries.size() < 4) {
      log.errors.push_back({{"step", step}, {"error", fmt::format("[{}] {}", to_string(e.code()), e.what())}});
      recover(c, log);
      return {};
    }
    if (!c.transfer_fault() || e.code() == errc::verification_failed) throw;
    log.errors.push_back({{"step", step}, {"error", fmt::format("[{}] {}", to_string(e.code()), e.what())}});
    log.record({{"type", "error"}, {"rank", c.rank}, {"step", step}, {"error", log.errors.back()["error"]}});
    return {};
  }
}

// The layers committed in this step, each verified. Async: commits in a step belong to the
// rebalance in flight (layers 0, 1, ... in order), and a new one may start after them in the same
// step. Sync: a rebalance starts and commits in one step, and a failed one may have committed some
// of its layers before it threw (the report then says nothing): the layers whose maps changed in
// this step are the committed ones, found by comparing with the maps from before the step.
void log_commits(rank_context& c, rank_log& log, const step_report& rep, const step_change& change, int step) {
  if (change.started && !c.cfg.use_async) log.begin_rebalance(step);
  const auto verify = [&](int layer) {
    log.commits.push_back({log.rebalance, layer, step});
    if (auto bad = verify_layer(c.state, c.model, layer, c.state.rank()); !bad.empty())
      fail(errc::verification_failed, "{}", bad);
  };
  if (c.cfg.use_async) {
    for (int k = 0; k < change.committed; ++k, ++log.layer) verify(log.layer);
  } else if (change.committed > 0) {
    for (int l = 0; l < c.preset.layers; ++l) {
      const auto now = c.state.maps().phy2log(l);
      if (!std::equal(now.begin(), now.end(), change.maps_before.row(static_cast<std::size_t>(l)).begin())) verify(l);
    }
  }
  if (rep.rebalance_finished) {
    const auto& m = c.state.stats();
    log.rebalances.push_back({{"trigger_step", log.trigger_step},
                              {"finish_step", step},
                              {"before", m.balancedness_before},
                              {"after", m.balancedness_after},
                              {"seconds", m.rebalance_seconds},
                              {"skipped", rep.rebalance_skipped},
                              {"bytes", m.bytes_moved - log.bytes_seen}});
    log.bytes_seen = m.bytes_moved;
    auto line = log.rebalances.back();
    line["type"] = "rebalance";
    line["rank"] = c.rank;
    log.record(std::move(line));
  }
  if (change.started && c.cfg.use_async) log.begin_rebalance(step);
}

// One serving step: the forward pass stand-in (background staging overlaps it, as it overlaps real
// forwards), the routed load recorded, step() timed, and the layers it committed verified.
void serve_step(rank_context& c, router& route, rank_log& log, int step) {
  const auto& cfg = c.cfg;
  if (cfg.forward.count() > 0) std::this_thread::sleep_for(cfg.forward);
  for (int l = 0; l < c.preset.layers; ++l) {
    const auto counts = route.route(l, step, c.state.maps());
    if (log.sampler) log.sampler->add(l, counts);
    c.state.record_load(l, counts);
  }
  if (c.transfer_fault() && c.rank == cfg.transfer_fault_rank && step == cfg.transfer_fault_step) {
    c.faults->countdown = 1;
  }
  const auto& m = c.state.stats();
  const bool busy = m.rebalance_in_flight;
  const auto committed_before = m.layers_committed;
  const auto rebalances_before = m.rebalances;
  step_change change;
  if (!c.cfg.use_async) change.maps_before = c.state.maps().phy2log();
  const auto recoveries = log.recoveries.size();
  const auto t0 = clock_type::now();
  const step_report rep = checked_step(c, log, step);
  const double us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
  change.started = m.rebalances != rebalances_before;
  change.committed = static_cast<int>(m.layers_committed - committed_before);
  if (log.recoveries.size() != recoveries) change = {};  // recover() moved and verified every layer itself
  (busy || change.started ? log.busy_us : log.idle_us).push_back(us);
  log_commits(c, log, rep, change, step);
  if (log.sampler) log.sampler->end_step(step);
  log.record({{"type", "step"},
              {"rank", c.rank},
              {"step", step},
              {"host_us", us},
              {"rebalancing", busy || change.started},
              {"committed", change.committed}});
}

std::string scale_key(std::size_t event) {
  return fmt::format("simulate-scale/{}", event);
}

// --scale: every rank of the set rescales before the event's step (rank 0 first tells the joining
// ranks which epoch to join); the rank set's change is recorded and every layer verified. False
// when this rank left.
bool rescale_at(rank_context& c, rank_log& log, std::size_t event, int step) {
  const int size = c.cfg.scale[event].second;
  const int old = c.state.num_ranks();
  rescale_params p{.new_size = size};
  for (int r = 0; r < old; ++r) p.rank_mapping.push_back(r < size ? r : -1);  // the highest ranks leave
  const auto epoch = c.state.stats().rank_set_epoch + 1;
  if (c.state.rank() == 0) c.store->set(scale_key(event), std::to_string(epoch));
  if (c.worlds) p.comm_setup = comm::setup{.world = c.worlds->of_set(epoch, size)};
  const auto masked_before = c.state.masked_experts().size();
  const auto rep = c.state.rescale(std::move(p));
  log.rank_sets.push_back({{"step", step},
                           {"num_ranks", size},
                           {"epoch", rep.epoch},
                           {"layers_moved", rep.layers_moved},
                           {"seconds", rep.seconds},
                           {"fill_error", rep.fill_error}});
  if (rep.left) return false;
  for (int l = 0; l < c.preset.layers; ++l) {
    if (auto bad = verify_layer(c.state, c.model, l, c.state.rank()); !bad.empty())
      fail(errc::verification_failed, "after rescale(): {}", bad);
  }
  // No expert lost its last replica: a rescale moves what leaving ranks held, it loses nothing.
  if (const auto masked = c.state.masked_experts(); masked.size() > masked_before) {
    fail(errc::verification_failed, "after rescale(): layer {} expert {} has no replica ({} such experts)",
         masked.front().layer, masked.front().expert, masked.size());
  }
  log.rebalance = static_cast<int>(c.state.stats().rebalances) - 1;
  return true;
}

// The size of the last set: the ranks that meet at the end.
int final_size(const simulate_config& cfg) {
  return cfg.scale.empty() ? cfg.ranks : cfg.scale.back().second;
}

// Every step, then a meeting of all ranks; false when this rank dies, stops or leaves on purpose
// (--fail-rank, --stop-rank, --scale).
bool serve(rank_context& c, rank_log& log, bool print_progress) {
  router route(c.cfg, c.preset.layers, c.preset.experts, c.rank);
  progress bar(print_progress && c.rank == 0, c.cfg.steps);
  for (int step = c.role.start_step + 1; step <= c.cfg.steps; ++step) {
    for (std::size_t k = 0; k < c.cfg.scale.size(); ++k) {
      if (c.cfg.scale[k].first == step && static_cast<int>(k) != c.role.join_event && !rescale_at(c, log, k, step)) {
        log.left_step = step;
        return false;
      }
    }
    if (c.rank == c.cfg.fail_rank && step == c.cfg.fail_step) {
      // --survive with processes: a real death, nothing said to the peers (threads cannot be killed
      // alone: the loopback world marks the rank dead, so its transfers fail at once).
      if (c.cfg.survive && c.cfg.procs) ::raise(SIGKILL);
      if (c.world) comm::mark_dead(*c.world, c.rank);
      return false;
    }
    if (c.rank == c.cfg.stop_rank && step == c.cfg.stop_step) return false;
    serve_step(c, route, log, step);
    // After recover() every survivor goes on from the same step count (the most any had served).
    step = std::max<int>(step, static_cast<int>(c.state.stats().steps));
    bar.update(step, c.state.stats(), step == c.cfg.steps);
  }
  // A rank that died outside a rebalance is noticed here: every live rank must reach the end.
  comm::store_barrier(*c.store, "simulate-end", final_size(c.cfg) - (c.cfg.survive ? 1 : 0), c.cfg.timeout);
  return true;
}

std::string rank_failure(int rank, const error& e, const std::string& what) {
  return fmt::format("rank {}: [{}] {}", rank, to_string(e.code()), what);
}

// A peer died or stalled, or this rank failed: stop cleanly, then check that every layer still
// holds exactly what its (committed) maps say.
// stop(), timed for the report (issue 17: bounded whatever is in flight).
void timed_stop(rank_context& c, json& out) {
  const auto t0 = clock_type::now();
  c.state.stop();
  out["stop_ms"] = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

void report_failure(rank_context& c, const rank_log& log, const error& e, json& out) {
  out["failure"] = rank_failure(c.rank, e, e.what());
  timed_stop(c, out);
  bool intact = true;
  for (int l = 0; l < c.preset.layers && intact; ++l)
    intact = verify_layer(c.state, c.model, l, c.state.rank()).empty();
  out["weights_intact"] = intact;
  out["maps_digest"] = maps_digest(c.state);
  out["errors"] = log.errors;
  log.write_timings(out);
}

// Every step served: every layer is verified once more before the rank reports success.
void report_success(rank_context& c, const rank_log& log, json& out) {
  for (int l = 0; l < c.preset.layers; ++l) {
    if (auto bad = verify_layer(c.state, c.model, l, c.state.rank()); !bad.empty())
      fail(errc::verification_failed, "{}", bad);
  }
  out["bytes_moved"] = c.state.stats().bytes_moved;
  out["maps_digest"] = maps_digest(c.state);
  out["errors"] = log.errors;
  out["communicators_made"] = c.transfer_fault() ? c.faults->made.load() : 1;
  out["verified"] = true;
  timed_stop(c, out);
}

// --stop-rank: stop() at a random moment of whatever runs, check the weights, leave the run (the
// peers' end meeting does not wait for this rank).
void report_stop(rank_context& c, const rank_log& log, json& out) {
  out["failure"] = fmt::format("rank {}: stopped at step {} (injected)", c.rank, c.cfg.stop_step);
  out["stopped"] = true;
  timed_stop(c, out);
  bool intact = true;
  for (int l = 0; l < c.preset.layers && intact; ++l)
    intact = verify_layer(c.state, c.model, l, c.state.rank()).empty();
  out["weights_intact"] = intact;
  out["maps_digest"] = maps_digest(c.state);
  out["errors"] = log.errors;
  try {
    (void)c.store->add("simulate-end", 1);
  } catch (const error&) {  // NOLINT(bugprone-empty-catch): the peers then time out at the meeting
  }
  log.write_timings(out);
}

// Memory reserved for rebalances, and the allocations made after the reserve (every one counted
// by the device's allocator hook; overflows are those the state itself counts).
void report_memory(const rank_context& c, std::int64_t baseline, json& out) {
  const auto& m = c.state.stats();
  out["reserved_device_bytes"] = m.reserved_device_bytes;
  out["reserved_pinned_bytes"] = m.reserved_pinned_bytes;
  out["reserve_overflows"] = m.reserve_overflows;
  out["allocations_after_reserve"] = c.allocations->count() - baseline;
}

}  // namespace

// --scale, a joining worker: the epoch rank 0 of the set announces before it rescales; waited for
// as long as the run may take to reach that step.
std::int64_t join_epoch_of(const scale_role& role, comm::store& store) {
  if (role.join_event < 0) return 0;
  return std::stoll(store.get(scale_key(static_cast<std::size_t>(role.join_event)), std::chrono::hours(1)));
}

// A joining rank's slots, once the rearrangement that fills them ended: verified.
void verify_joined(rank_context& c, rank_log& log) {
  if (c.role.join_event < 0) return;
  for (int l = 0; l < c.preset.layers; ++l) {
    if (auto bad = verify_layer(c.state, c.model, l, c.state.rank()); !bad.empty())
      fail(errc::verification_failed, "after joining: {}", bad);
  }
  log.rebalance = static_cast<int>(c.state.stats().rebalances) - 1;
}

json run_rank(const simulate_config& cfg, int worker, std::shared_ptr<comm::store> store,
              std::shared_ptr<loopback_worlds> worlds, bool print_progress) {
  auto preset = preset_for(cfg);
  const auto role = role_of(cfg, worker);
  const int rank = role.rank;
  json out = {
      {"rank", rank}, {"worker", worker}, {"verified", false}, {"failure", ""}, {"present_from", role.start_step + 1}};
  rank_log log;
  try {
    log.open_trace(cfg, preset);
    const auto epoch = join_epoch_of(role, *store);
    rank_context c(cfg, std::move(preset), role, epoch, std::move(store), std::move(worlds));
    verify_joined(c, log);
    (void)c.model.snapshot(0);  // verification's scratch, made before the count starts
    const auto baseline = c.allocations->count();
    try {
      if (!serve(c, log, print_progress)) {
        if (log.left_step > 0) {
          out["left"] = true;
          out["present_to"] = log.left_step - 1;
          out["verified"] = true;  // its slots serve nothing any more; every layer verified before it left
          log.write_timings(out);
          return out;
        }
        if (rank == cfg.stop_rank) {
          report_stop(c, log, out);
          return out;
        }
        out["failure"] = fmt::format("rank {}: died at step {} (injected)", rank, cfg.fail_step);
        out["died"] = true;
        return out;
      }
    } catch (const error& e) {
      report_failure(c, log, e, out);
      report_memory(c, baseline, out);
      return out;
    }
    report_success(c, log, out);
    report_memory(c, baseline, out);
  } catch (const error& e) {
    std::string what = e.what();
    if (e.code() == errc::timeout && what.find("simulate-end") != std::string::npos) {
      what = fmt::format("{} (a rank stopped before the end)", what);
    }
    out["failure"] = rank_failure(rank, e, what);
  }
  log.write_timings(out);
  return out;
}

}  // namespace eplb::tools

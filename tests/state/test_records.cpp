// Issue 21 item 1: rebalance records, the event hook and the Prometheus text, on 4 loopback ranks
// (threads). Records carry the same id, steps and global balancedness on every rank, their bytes
// add up to the metrics, skipped and failed rebalances are recorded as such, the history is
// bounded, events arrive in order on the thread that calls step(), and the Prometheus text parses.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <array>
#include <atomic>
#include <barrier>
#include <map>
#include <numeric>
#include <regex>
#include <sstream>
#include <thread>

#include "check_error.hpp"
#include "eplb/state.hpp"
#include "on_ranks.hpp"
#include "tools/exchange.hpp"
#include "tools/faulty_comm.hpp"

using namespace eplb;
using eplb::testing::on_ranks;
using namespace std::chrono_literals;

namespace {

constexpr int ranks = 4;
constexpr int layers = 4;

struct seen_event {
  event_level level;
  event_kind kind;
  std::int64_t step;
  std::int64_t id;
  std::string message;
  std::thread::id thread;
  std::optional<rebalance_outcome> outcome;
};

struct rank_run {
  std::vector<rebalance_record> from_reports;  // step_report::finished, in order
  std::vector<std::int64_t> started_ids;
  int ended_and_started = 0;  // steps whose report has a finished record and a new start
  std::vector<rebalance_record> history;
  std::vector<seen_event> events;
  std::vector<std::string> errors;  // what step() threw
  std::thread::id serving;
  metrics stats;
  std::string prometheus;
  rebalance_record stopped;  // the last record after stop()
  double window_total = 0;   // of window_load(): this rank's
  matrix<double> global_window;
};

struct run_options {
  bool use_async = false;
  double min_improvement = -1;  // always carried out (vLLM): every rebalance commits
  int history_size = 64;
  int interval = 20;
  int steps = 200;
  int fault_rank = -1;  // arms a transfer fault on this rank at fault_step
  int fault_step = 0;
  bool quiet_log = true;  // false: no on_event, every line goes to `log`
  int stop_at = -1;       // every rank stops here (after drain: none), without stepping on
};

// A few hot experts, moving every 25 steps, so that every rebalance has something to move.
std::vector<std::int64_t> moving_counts(int step, int layer, int rank) {
  std::vector<std::int64_t> c(16);
  const int phase = (step / 25 + layer) % 16;
  for (int s = 0; s < 16; ++s) c[static_cast<std::size_t>(s)] = ((s + phase) % 16 < 3 ? 80 : 1) + (step + rank + s) % 5;
  return c;
}

state_params params(const run_options& o, int rank, tools::pattern_model& model, device::device& dev,
                    device::stream& stream, const std::shared_ptr<comm::loopback_world>& world,
                    const std::shared_ptr<comm::store>& store) {
  state_params p;
  p.cfg.communicator = "loopback";
  p.cfg.use_async = o.use_async;
  p.cfg.num_redundant_experts = 4;
  p.cfg.window_size = 10;
  p.cfg.step_interval = o.interval;
  p.cfg.timeout = 5s;
  p.cfg.min_improvement = o.min_improvement;
  p.cfg.history_size = o.history_size;
  p.cfg.commit_lag_steps = 2;
  p.model = {model.shape(), 2, 1};
  p.rank = rank;
  p.dev = &dev;
  p.serving_stream = &stream;
  p.weights = model.weights();
  p.store = store;
  p.comm_setup.world = world;
  p.log = [](std::string_view) {};
  return p;
}

// Two counters, one written while the other is read: how many ranks still have a rebalance in flight.
using busy_ranks = std::array<std::atomic<int>, 2>;

// After drain(): every rank steps on, in the same steps, until no rank has a rebalance in flight
// (async: on a loaded machine the background may still be staging the last one), so that every
// record the test counts has ended.
void finish_in_flight(eplb_state& state, std::barrier<>& sync, busy_ranks& busy) {
  for (int extra = 0; extra < 20'000; ++extra) {
    auto& now = busy[static_cast<std::size_t>(extra % 2)];
    sync.arrive_and_wait();
    (void)state.step();
    if (state.stats().rebalance_in_flight) ++now;
    sync.arrive_and_wait();
    const bool done = now.load() == 0;
    sync.arrive_and_wait();  // everyone has read `now`: it may be cleared for the iteration after next
    now = 0;
    if (done) return;
    std::this_thread::sleep_for(1ms);
  }
  FAIL("a rebalance still in flight after 20000 steps");
}

rank_run run_rank(const run_options& o, int rank, const std::shared_ptr<comm::loopback_world>& world,
                  const std::shared_ptr<comm::store>& store, std::barrier<>& sync, busy_ranks& busy) {
  auto dev = device::make_host_device();
  auto stream = dev->create_stream();
  tools::exchange_config shape{.ranks = ranks, .layers = layers, .experts = 12, .redundant = 4, .tensor_bytes = {256}};
  tools::pattern_model model(tools::pattern_shape(shape), rank, *dev, *stream, tools::round_placement(shape, 0, {}),
                             10s);
  rank_run out;
  out.serving = std::this_thread::get_id();
  auto p = params(o, rank, model, *dev, *stream, world, store);
  auto sw = std::make_shared<tools::fault_switch>();
  p.comm_wrap = [sw](std::unique_ptr<comm::communicator> inner, int) -> std::unique_ptr<comm::communicator> {
    return std::make_unique<tools::faulty_communicator>(std::move(inner), sw);
  };
  const auto keep = [&out](event_level level, event_kind kind, std::int64_t step, std::int64_t id, std::string_view msg,
                           const rebalance_record* r) {
    out.events.push_back({level, kind, step, id, std::string(msg), std::this_thread::get_id(),
                          r ? std::optional(r->outcome) : std::nullopt});
  };
  if (o.quiet_log) {
    p.on_event = [keep](const event& e) { keep(e.level, e.kind, e.step, e.rebalance_id, e.message, e.record); };
  } else {
    p.log = [keep](std::string_view line) { keep(event_level::info, event_kind::balancedness, 0, 0, line, nullptr); };
  }
  eplb_state state(std::move(p));
  for (int step = 0; step < o.steps; ++step) {
    sync.arrive_and_wait();  // the engine's all-to-all: ranks stay within a step of each other
    if (step == o.steps - 40 && o.stop_at < 0) state.drain();  // every rebalance ends inside the run
    if (step == o.stop_at) break;
    if (rank == o.fault_rank && step == o.fault_step) sw->countdown = 1;
    if (o.use_async) std::this_thread::sleep_for(200us);  // an engine's forward pass: the background stages
    for (int l = 0; l < layers; ++l) state.record_load(l, moving_counts(step, l, rank));
    try {
      const auto rep = state.step();
      if (rep.finished) out.from_reports.push_back(*rep.finished);
      if (rep.started_id != 0) out.started_ids.push_back(rep.started_id);
      if (rep.finished && rep.started_id != 0) {
        ++out.ended_and_started;
        // The record keeps its own id: sync ends the rebalance it started; async ends the previous.
        CHECK(rep.finished->id == rep.started_id - (o.use_async ? 1 : 0));
      }
    } catch (const error& e) {
      out.errors.emplace_back(e.what());
    }
  }
  if (o.stop_at < 0) finish_in_flight(state, sync, busy);
  out.history = state.history();
  out.stats = state.stats();
  for (const auto v : state.window_load().flat()) out.window_total += static_cast<double>(v);
  out.global_window = state.global_window_load();
  out.prometheus = state.prometheus_text();
  state.stop();  // with stop_at, mid-rebalance: its record ends as stopped
  if (!state.history().empty()) out.stopped = state.history().back();
  return out;
}

std::vector<rank_run> run(const run_options& o) {
  auto world = comm::make_loopback_world(ranks);
  auto store = comm::make_memory_store();
  std::barrier<> sync(ranks);
  busy_ranks busy{};
  return on_ranks(ranks, [&](int r) { return run_rank(o, r, world, store, sync, busy); });
}

// What every rank must agree on.
void check_same_on_every_rank(const std::vector<rank_run>& runs) {
  for (const auto& r : runs) {
    REQUIRE(r.history.size() == runs[0].history.size());
    for (std::size_t i = 0; i < r.history.size(); ++i) {
      const auto &a = r.history[i], &b = runs[0].history[i];
      CHECK(a.id == b.id);
      CHECK(a.trigger_step == b.trigger_step);
      CHECK(a.start_step == b.start_step);
      CHECK(a.outcome == b.outcome);
      CHECK(a.balancedness_before == b.balancedness_before);
      CHECK(a.balancedness_after == b.balancedness_after);
      CHECK(a.balancedness_ideal == b.balancedness_ideal);
      CHECK(a.layers_committed == b.layers_committed);
    }
  }
}

void check_committed(const std::vector<rank_run>& runs) {
  for (const auto& r : runs) {
    CAPTURE(r.errors.size());
    REQUIRE(r.history.size() >= 3);
    std::uint64_t received = 0;
    for (std::size_t i = 0; i < r.history.size(); ++i) {
      const auto& h = r.history[i];
      CAPTURE(h.id);
      CHECK(h.id == static_cast<std::int64_t>(i) + 1);  // consecutive from the first
      CHECK(h.outcome == rebalance_outcome::committed);
      CHECK(h.layers_committed == layers);
      CHECK(h.trigger_step <= h.start_step);
      CHECK(h.start_step <= h.end_step);
      CHECK(h.balancedness_before > 0);
      CHECK(h.balancedness_ideal > 0);
      CHECK(h.balancedness_after == doctest::Approx(h.balancedness_ideal));  // every layer committed: the plan
      CHECK(h.bytes_same_node + h.bytes_cross_node == h.bytes_sent + h.bytes_received);
      const auto per_peer = std::accumulate(h.bytes_per_peer.begin(), h.bytes_per_peer.end(), std::uint64_t{0});
      CHECK(per_peer == h.bytes_sent + h.bytes_received);
      CHECK(h.total_seconds >= h.plan_seconds);
      received += h.bytes_received;
    }
    CHECK(received > 0);
    CHECK(received == r.stats.bytes_moved);  // every rebalance ended inside the run
    // The reports carry the same records as the history, with their own ids.
    REQUIRE(r.from_reports.size() == r.history.size());
    for (std::size_t i = 0; i < r.history.size(); ++i) CHECK(r.from_reports[i].id == r.history[i].id);
    CHECK(r.started_ids.size() == static_cast<std::size_t>(r.stats.rebalances));
  }
}

// A small checker of text exposition format 0.0.4: every line a HELP, a TYPE or a sample of the
// family declared last (counters end in _total), labelled rank="N" first; histogram buckets
// cumulative, the last le="+Inf" and equal to _count. Returns the first violation ("" if none) and
// fills `out` with the samples by name and extra labels.
std::string check_prometheus(const std::string& text, int rank, std::map<std::string, double>& out) {
  static const std::regex help(R"(# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .+)");
  static const std::regex type(R"(# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram))");
  static const std::regex sample(R"re(([a-zA-Z_:][a-zA-Z0-9_:]*)\{rank="(\d+)"((?:,[a-zA-Z_]+="[^"]*")*)\} (\S+))re");
  std::map<std::string, std::string> types;
  std::istringstream in(text);
  std::string line, family, last_le;
  double last_bucket = -1;
  if (!text.ends_with("\n")) return "no final newline";
  while (std::getline(in, line)) {
    std::smatch m;
    if (std::regex_match(line, m, help)) continue;
    if (std::regex_match(line, m, type)) {
      family = m[1];
      if (types.count(family) != 0) return "a second TYPE: " + line;
      types[family] = m[2];
      if (m[2] == "counter" && !family.ends_with("_total")) return "a counter not ending in _total: " + line;
      last_bucket = -1;
      continue;
    }
    if (!std::regex_match(line, m, sample)) return "not a sample: " + line;
    const std::string name = m[1], labels = m[3], v = m[4];
    if (std::stoi(m[2]) != rank) return "another rank: " + line;
    char* end = nullptr;
    const double value = v == "+Inf" ? HUGE_VAL : std::strtod(v.c_str(), &end);
    if (v != "+Inf" && (end == nullptr || *end != '\0')) return "not a number: " + line;
    if (types.count(family) == 0) return "a sample before its TYPE: " + line;
    if (types[family] == "histogram") {
      if (name == family + "_bucket") {
        if (value < last_bucket) return "buckets not cumulative: " + line;
        last_bucket = value;
        last_le = labels;
      } else if (name == family + "_count") {
        if (last_le != ",le=\"+Inf\"") return "the last bucket is not +Inf: " + line;
        if (value != last_bucket) return "_count is not the +Inf bucket: " + line;
      } else if (name != family + "_sum") {
        return "not a histogram sample: " + line;
      }
    } else if (name != family) {
      return "a sample of another family: " + line;
    }
    out[name + (labels.empty() ? "" : "{" + labels.substr(1) + "}")] = value;
  }
  return {};
}

}  // namespace

TEST_CASE("prometheus: the text parses, and its numbers are the records'") {
  const auto runs = run({.use_async = true, .steps = 240});
  for (std::size_t rank = 0; rank < runs.size(); ++rank) {
    const auto& r = runs[rank];
    std::map<std::string, double> s;
    CHECK(check_prometheus(r.prometheus, static_cast<int>(rank), s) == "");
    CHECK(s.at("eplb_rebalances_total{outcome=\"committed\"}") == static_cast<double>(r.history.size()));
    CHECK(s.at("eplb_rebalances_total{outcome=\"failed\"}") == 0);
    CHECK(s.at("eplb_rebalances_started_total") == static_cast<double>(r.stats.rebalances));
    CHECK(s.at("eplb_layers_committed_total") == static_cast<double>(r.stats.layers_committed));
    CHECK(s.at("eplb_bytes_moved_total{direction=\"received\"}") == static_cast<double>(r.stats.bytes_moved));
    CHECK(s.at("eplb_balancedness_after") == r.history.back().balancedness_after);
    CHECK(s.at("eplb_rebalance_duration_seconds_count") == static_cast<double>(r.history.size()));
    CHECK(r.stats.steps >= 240);
    CHECK(s.at("eplb_step_overhead_seconds_count") == static_cast<double>(r.stats.steps));
    CHECK(s.at("eplb_steps_total") == static_cast<double>(r.stats.steps));
  }
  // The checker refuses what it must (so that the checks above mean something).
  std::map<std::string, double> s;
  CHECK(check_prometheus("eplb_x{rank=\"0\"} 1\n", 0, s) != "");
  CHECK(check_prometheus("# TYPE a counter\na{rank=\"0\"} 1\n", 0, s) != "");
  const std::string hist = "# TYPE h histogram\nh_bucket{rank=\"0\",le=\"1\"} 2\nh_bucket{rank=\"0\",le=\"+Inf\"} 1\n";
  CHECK(check_prometheus(hist, 0, s).starts_with("buckets not cumulative"));
}

TEST_CASE("prometheus: a prefix that is not a metric name") {
  auto world = comm::make_loopback_world(1);
  auto dev = device::make_host_device();
  auto stream = dev->create_stream();
  tools::exchange_config shape{.ranks = 1, .layers = 1, .experts = 4, .redundant = 0, .tensor_bytes = {16}};
  tools::pattern_model model(tools::pattern_shape(shape), 0, *dev, *stream, tools::round_placement(shape, 0, {}), 10s);
  auto p = params({}, 0, model, *dev, *stream, world, comm::make_memory_store());
  p.cfg.num_redundant_experts = 0;
  eplb_state state(std::move(p));
  CHECK(state.prometheus_text("vllm:eplb").starts_with("# HELP vllm:eplb_steps_total"));
  for (const auto* bad : {"", "9eplb", "eplb-x", "eplb x"}) {
    CAPTURE(bad);
    CHECK_EPLB_ERROR(state.prometheus_text(bad), errc::invalid_argument, "is not a metric name");
  }
}

TEST_CASE("records: sync rebalances on 4 ranks") {
  const auto runs = run({.use_async = false});
  check_committed(runs);
  check_same_on_every_rank(runs);
  // The all-reduced window every rank planned from is the sum of the ranks' windows.
  double sum = 0;
  for (const auto& r : runs) sum += r.window_total;
  for (const auto& r : runs) {
    REQUIRE(r.global_window.rows() == static_cast<std::size_t>(layers));
    CHECK(r.global_window.flat()[0] == runs[0].global_window.flat()[0]);
    CHECK(std::accumulate(r.global_window.flat().begin(), r.global_window.flat().end(), 0.0) == sum);
  }
  CHECK(sum > 0);
}

TEST_CASE("records: async rebalances on 4 ranks") {
  const auto runs = run({.use_async = true, .steps = 240});
  check_committed(runs);
  check_same_on_every_rank(runs);
  for (const auto& r : runs) {
    for (const auto& h : r.history) {
      CHECK(h.start_step == h.trigger_step + load_readback_lag_steps);
      CHECK(h.first_commit_step > h.start_step);
    }
  }
}

TEST_CASE("records: a rebalance not better enough is recorded as skipped") {
  const auto runs = run({.min_improvement = 1.0, .steps = 100});
  for (const auto& r : runs) {
    REQUIRE(!r.history.empty());
    for (const auto& h : r.history) {
      CHECK(h.outcome == rebalance_outcome::skipped);
      CHECK(h.layers_committed == 0);
      CHECK(h.bytes_sent + h.bytes_received == 0);
      CHECK(h.balancedness_after == h.balancedness_before);
    }
    CHECK(r.stats.rebalances_skipped == static_cast<std::int64_t>(r.history.size()));
  }
  check_same_on_every_rank(runs);
}

TEST_CASE("records: the history keeps the last history_size rebalances") {
  const auto runs = run({.history_size = 3, .steps = 200});
  for (const auto& r : runs) {
    REQUIRE(r.history.size() == 3);
    const auto last = r.stats.rebalances;
    CHECK(r.history[0].id == last - 2);
    CHECK(r.history[2].id == last);
    CHECK(r.from_reports.size() == static_cast<std::size_t>(last));  // the reports saw every one
  }
}

TEST_CASE("records: a failed rebalance is recorded with its error, the next on a new communicator") {
  const auto runs = run({.fault_rank = 1, .fault_step = 30});
  for (const auto& r : runs) {
    REQUIRE(r.errors.size() == 1);  // the rebalance triggered at step 45 fails on every rank
    REQUIRE(r.history.size() >= 4);
    const auto& failed = r.history[2];
    CHECK(failed.id == 3);
    CHECK(failed.outcome == rebalance_outcome::failed);
    CHECK(failed.error == r.errors[0]);
    CHECK(failed.communicator_generation == 0);
    CHECK(r.stats.rebalances_failed == 1);
    const auto& next = r.history[3];
    CHECK(next.outcome == rebalance_outcome::committed);
    CHECK(next.communicator_generation > 0);
    const auto remade = std::count_if(r.events.begin(), r.events.end(),
                                      [](const auto& e) { return e.kind == event_kind::communicator_remade; });
    CHECK(remade == 1);
    // Made again in the load sum of the rebalance after the failed one: its event comes inside it.
    const auto remade_event = std::find_if(r.events.begin(), r.events.end(),
                                           [](const auto& e) { return e.kind == event_kind::communicator_remade; });
    REQUIRE(remade_event != r.events.end());
    CHECK(remade_event->id == next.id);
    CHECK(remade_event->step == next.start_step);
    const auto failed_event = std::find_if(r.events.begin(), r.events.end(),
                                           [](const auto& e) { return e.kind == event_kind::rebalance_failed; });
    REQUIRE(failed_event != r.events.end());
    CHECK(failed_event->id == 3);
    CHECK(failed_event->level == event_level::error);
    CHECK(failed_event->message.find(r.errors[0]) != std::string::npos);
  }
  check_same_on_every_rank(runs);
}

TEST_CASE("events: in order, on the serving thread; without a hook, `log` gets the lines") {
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    const auto runs = run({.use_async = use_async});
    for (const auto& r : runs) {
      std::map<std::int64_t, std::vector<event_kind>> by_id;
      std::int64_t last_step = 0;
      for (const auto& e : r.events) {
        CHECK(e.thread == r.serving);
        CHECK(e.step >= last_step);
        last_step = e.step;
        by_id[e.id].push_back(e.kind);
        if (e.kind == event_kind::rebalance_finished) CHECK(e.outcome == rebalance_outcome::committed);
      }
      CHECK(by_id.size() == r.history.size());
      for (const auto& [id, kinds] : by_id) {
        CAPTURE(id);
        REQUIRE(kinds.size() >= 3);
        CHECK(kinds.front() == event_kind::rebalance_started);
        CHECK(kinds[1] == event_kind::layers_committed);
        CHECK(kinds.back() == event_kind::rebalance_finished);
      }
    }
  }
  const auto lines = run({.steps = 60, .quiet_log = false});
  for (const auto& r : lines) {
    REQUIRE(r.events.size() == 2);  // rebalance 1 (drained at step 20): started, finished; no debug lines
    CHECK(r.events[0].message.find("rebalance 1 started") != std::string::npos);
    CHECK(r.events[1].message.find("rebalance 1 committed 4 layers") != std::string::npos);
  }
}

TEST_CASE("records: a rebalance that ends in the step the next starts keeps its own id") {
  // Async, interval 4: the next trigger is due before a rebalance ends, so it comes in its last step.
  const auto runs = run({.use_async = true, .interval = 4, .steps = 200});
  check_committed(runs);
  check_same_on_every_rank(runs);
  for (const auto& r : runs) CHECK(r.ended_and_started > 0);  // the case did happen
}

TEST_CASE("records: an async rebalance that fails is recorded with each rank's error") {
  const auto runs = run({.use_async = true, .steps = 300, .fault_rank = 2, .fault_step = 30});
  for (const auto& r : runs) {
    REQUIRE(r.errors.size() == 1);  // the rebalance staging at step 30 (2 or 3) fails everywhere
    const auto failed = std::find_if(r.history.begin(), r.history.end(),
                                     [](const auto& h) { return h.outcome == rebalance_outcome::failed; });
    REQUIRE(failed != r.history.end());
    CHECK(failed->id == runs[0].history[static_cast<std::size_t>(failed - r.history.begin())].id);
    CHECK(failed->error == r.errors[0]);
    CHECK(r.stats.rebalances_failed == 1);
    REQUIRE(failed + 1 != r.history.end());
    CHECK((failed + 1)->outcome == rebalance_outcome::committed);
    CHECK((failed + 1)->communicator_generation > 0);
  }
  CHECK(runs[2].errors[0].find("rebalance failed on rank 2") != std::string::npos);
  check_same_on_every_rank(runs);
}

TEST_CASE("records: stop() mid-rebalance ends its record as stopped") {
  // Async: rebalance 2 is triggered at step 25 and starts at 27 (unless rebalance 1 is still in
  // flight then); every rank stops after step 28, with the last one started still in flight.
  const auto runs = run({.use_async = true, .steps = 60, .stop_at = 28});
  for (const auto& r : runs) {
    REQUIRE(!r.started_ids.empty());
    CHECK(r.history.size() == r.started_ids.size() - 1);  // taken before stop()
    CHECK(r.stopped.id == r.started_ids.back());
    CHECK(r.stopped.outcome == rebalance_outcome::stopped);
    CHECK(r.stopped.error == "stopped by eplb_state::stop()");
  }
}

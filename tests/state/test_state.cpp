// EplbState on loopback ranks (threads): config validation, sync and async rebalances with every
// committed layer verified byte for byte, same-step commits on every rank under injected delays,
// failures that leave uncommitted layers untouched, and stop() mid-rebalance.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <unistd.h>

#include <fstream>
#include <future>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include "check_error.hpp"
#include "device/event_state.hpp"
#include "eplb/state.hpp"
#include "on_ranks.hpp"
#include "state/loopback_ranks.hpp"
#include "tools/exchange.hpp"

using namespace eplb;
using eplb::testing::on_ranks;
using namespace eplb::testing::loopback_ranks;
using namespace std::chrono_literals;

namespace {

// An event completed by the test: a stream waiting on it (the engine's forward pass, still running)
// runs nothing queued after it until open(), then runs it all.
struct gate {
  std::shared_ptr<device::detail::event_state> state = std::make_shared<device::detail::event_state>();
  [[nodiscard]] device::event event() const { return device::event(state); }
  void open() const { state->complete(nullptr); }
};

}  // namespace

TEST_CASE("config: defaults, auto-selection and every invalid field") {
  config c;
  CHECK(c.window_size == 1000);
  CHECK(c.step_interval == 3000);
  CHECK(c.resolved_communicator() == comm::backend::nccl);
  c.use_async = true;
  CHECK(c.resolved_communicator() == comm::backend::gloo);
  c.use_async = false;
  c.elastic = true;
  CHECK(c.resolved_communicator() == comm::backend::stateless_nccl);
  c.use_async = true;  // elastic async: gloo, made again for every rank set (issue 20)
  CHECK(c.resolved_communicator() == comm::backend::gloo);
  c.use_async = false;
  // cuda_ipc launches no kernels: allowed in async mode, when asked for.
  const auto ipc = config::from_json(R"({"use_async": true, "communicator": "cuda_ipc"})");
  CHECK(ipc.resolved_communicator() == comm::backend::cuda_ipc);
  struct bad {
    const char* json;
    const char* text;
  };
  const bad cases[] = {
      {R"({"window_size": 0})", "window_size: 0 is not allowed (must be > 0)"},
      {R"({"step_interval": -5})", "step_interval: -5 is not allowed"},
      {R"({"num_redundant_experts": -1})", "num_redundant_experts: -1 is not allowed (must be >= 0)"},
      {R"({"log_balancedness_interval": 0})", "log_balancedness_interval: 0"},
      {R"({"timeout_ms": 0})", "timeout_ms: 0"},
      {R"({"policy": "greedy"})", "policy: \"greedy\" is not allowed (allowed: \"default\", \"min_move\")"},
      {R"({"communicator": "mpi"})", "communicator: \"mpi\" is not allowed (allowed: auto, nccl, gloo"},
      {R"({"use_async": true, "communicator": "nccl"})", "communicator: \"nccl\" is not allowed with use_async"},
      {R"({"use_async": true, "elastic": true, "communicator": "stateless_nccl"})",
       "\"stateless_nccl\" is not allowed with use_async"},
      {R"({"use_async": "yes"})", "use_async: \"yes\" is not allowed (must be true or false)"},
      {R"({"window_size": 1.5})", "window_size: 1.5 is not allowed (must be an integer)"},
      {R"({"staging_bytes": -1})", "staging_bytes: -1 is not allowed"},
      {R"({"windowsize": 10})", "windowsize: unknown field"},
      {R"([1])", "config: must be a JSON object"},
      {R"({"window_size": )", "config: not valid JSON"},
  };
  for (const auto& b : cases) {
    CAPTURE(b.json);
    CHECK_EPLB_ERROR(config::from_json(b.json), errc::invalid_config, b.text);
  }
  const auto ok =
      config::from_json(R"({"window_size": 10, "step_interval": 20, "use_async": true, "timeout_ms": 500})");
  CHECK(ok.window_size == 10);
  CHECK(ok.timeout == 500ms);
}

TEST_CASE("state: bad parameters are clear errors") {
  auto world = comm::make_loopback_world(2);
  config cfg;
  cfg.communicator = "loopback";
  cfg.num_redundant_experts = 3;  // the model below has 12 experts in 16 slots: 4 redundant
  CHECK_EPLB_ERROR(make_rank(0, 2, cfg, world, comm::make_memory_store()), errc::invalid_config,
                   "num_redundant_experts: 3 does not match the model");
  cfg.num_redundant_experts = 4;
  cfg.use_async = true;
  cfg.communicator = "nccl";
  CHECK_EPLB_ERROR(make_rank(0, 2, cfg, world, comm::make_memory_store()), errc::invalid_config,
                   "not allowed with use_async");
}

TEST_CASE("sync rebalance on 4 loopback ranks: balancedness improves, every byte verified") {
  const int ranks = 4;
  for (const bool reg : {false, true}) {  // registered staging packs every message: same outcome
    CAPTURE(reg);
    auto world = comm::make_loopback_world(ranks);
    auto store = comm::make_memory_store();
    auto cfg = loopback_config(false, 20, 40, 10s);
    cfg.register_buffers = reg;
    const auto results = on_ranks(ranks, [&](int rank) -> std::string {
      auto r = make_rank(rank, ranks, cfg, world, store);
      int rebalances = 0;
      for (int step = 0; step < 100; ++step) {
        for (int l = 0; l < 4; ++l) r.state->record_load(l, skewed_counts(16, step, l, rank));
        const auto rep = r.state->step();
        if (rep.rebalance_finished) {
          ++rebalances;
          CHECK(rep.layers_committed == 4);
          for (int l = 0; l < 4; ++l) {
            if (auto bad = verify(r, l, rank); !bad.empty()) return bad;
          }
        }
      }
      const auto& m = r.state->stats();
      CHECK(rebalances == 3);  // steps 10, 50, 90: the first after a quarter interval
      CHECK(m.balancedness_after >= m.balancedness_before);
      CHECK(m.layers_committed == 12);
      return "";
    });
    for (const auto& r : results) CHECK_MESSAGE(r.empty(), r);
  }
}

TEST_CASE("async rebalances on 4 loopback ranks under injected delays: same-step commits, bytes verified") {
  const int ranks = 4;
  auto world = comm::make_loopback_world(ranks);
  auto store = comm::make_memory_store();
  const auto cfg = loopback_config(true, 10, 24, 20s);
  const int steps = 600;
  // Per rank: the step at which each (rebalance, layer) was committed.
  const auto results = on_ranks(ranks, [&](int rank) {
    std::map<std::pair<int, int>, int> commits;
    auto r = make_rank(rank, ranks, cfg, world, store, {.max_delay = 1ms, .seed = 11U + static_cast<unsigned>(rank)});
    std::mt19937_64 pace(rank);
    int rebalance = 0, layer = 0;
    std::string failure;
    // Past `steps`, drain: a rank that stops with a rebalance in flight aborts it and tells its
    // peers (issue 17), so every rank starts no more rebalances (drain(), in the same step) and
    // steps on until none is in flight, which all see in one step.
    for (int step = 0; (step < steps || r.state->stats().rebalance_in_flight) && step < steps + 400 && failure.empty();
         ++step) {
      if (step == steps) r.state->drain();
      for (int l = 0; l < 4; ++l) r.state->record_load(l, skewed_counts(16, step, l + step / 50, rank));
      // A forward pass stand-in: before issue 17, step() itself took about this long, waiting for
      // its per-step load copies under the injected delays; now it queues nothing.
      std::this_thread::sleep_for(1500us);
      if (pace() % 7 == 0) std::this_thread::sleep_for(std::chrono::microseconds(pace() % 2000));
      step_report rep;
      try {
        rep = r.state->step();
      } catch (const error& e) {
        failure = fmt::format("rank {} step {}: {}", rank, step, e.what());
        break;
      }
      for (int k = 0; k < rep.layers_committed; ++k) {
        commits[{rebalance, layer}] = step;
        if (auto bad = verify(r, layer, rank); !bad.empty()) failure = bad;
        if (++layer == 4) {
          layer = 0;
          ++rebalance;
        }
      }
    }
    r.state->stop();
    return std::make_pair(commits, failure);
  });
  for (const auto& [commits, failure] : results) CHECK_MESSAGE(failure.empty(), failure);
  CHECK(results[0].first.size() >= 40);  // about 25 rebalances of 4 layers each
  for (int r = 1; r < ranks; ++r) CHECK(results[r].first == results[0].first);
}

TEST_CASE("async: a device fault on one rank stops the rebalance everywhere; uncommitted layers untouched") {
  const int ranks = 2;
  auto world = comm::make_loopback_world(ranks);
  auto store = comm::make_memory_store();
  const auto cfg = loopback_config(true, 10, 20, 5s);
  const auto results = on_ranks(ranks, [&](int rank) -> std::string {
    auto r = make_rank(rank, ranks, cfg, world, store);
    std::vector<std::vector<std::byte>> before;
    for (int l = 0; l < 4; ++l) before.push_back(r.model->snapshot(l));
    const auto maps_before = r.state->maps().phy2log();
    // Rank 1's streams fail a few operations into the first rebalance: after the reading of its
    // window (a copy and a mark in step 5; quiet steps queue nothing since issue 17), 8 into staging.
    if (rank == 1) device::fail_host_device_after(*r.dev, 2 + 8);
    // Paced as serving steps are: unpaced, 200 steps can end before a loaded machine has run the
    // background staging that meets the fault (CI under ASan saw "no error" on both ranks).
    for (int step = 0; step < 2000; ++step) {
      std::this_thread::sleep_for(1ms);
      for (int l = 0; l < 4; ++l) r.state->record_load(l, skewed_counts(16, step, l, rank));
      try {
        r.state->step();
      } catch (const error& e) {
        if (rank == 1) return fmt::format("error: {}", e.what());  // its device is broken: nothing to read back
        const int committed = static_cast<int>(r.state->stats().layers_committed);
        for (int l = committed; l < 4; ++l) {
          if (r.model->snapshot(l) != before[static_cast<std::size_t>(l)]) return fmt::format("layer {} changed", l);
          const auto row = r.state->maps().phy2log(l);
          if (!std::equal(row.begin(), row.end(), maps_before.row(static_cast<std::size_t>(l)).begin())) {
            return fmt::format("layer {} maps changed", l);
          }
        }
        return fmt::format("error: {}", e.what());
      }
    }
    return "no error";
  });
  INFO(results[0]);
  INFO(results[1]);
  CHECK(results[0].rfind("error:", 0) == 0);
  CHECK(results[1].rfind("error:", 0) == 0);
  CHECK((results[0].find("rank 1") != std::string::npos || results[0].find("injected fault") != std::string::npos));
}

TEST_CASE("async: stop() in the middle of a rebalance is clean and prompt") {
  const int ranks = 2;
  auto world = comm::make_loopback_world(ranks);
  auto store = comm::make_memory_store();
  const auto cfg = loopback_config(true, 4, 8, 3s);
  const auto results = on_ranks(ranks, [&](int rank) {
    auto r = make_rank(rank, ranks, cfg, world, store, {.max_delay = 3ms, .seed = 3});
    bool started = false;
    for (int step = 0; step < 40 && !started; ++step) {
      for (int l = 0; l < 4; ++l) r.state->record_load(l, skewed_counts(16, step, l, rank));
      started = r.state->step().rebalance_started;
    }
    const auto t0 = std::chrono::steady_clock::now();
    r.state->stop();
    r.state->stop();  // idempotent
    const auto took = std::chrono::steady_clock::now() - t0;
    CHECK_EPLB_ERROR(r.state->step(), errc::cancelled, "stopped");
    return started && took < 10s;
  });
  CHECK(results[0]);
  CHECK(results[1]);
}

// Issue 15: after a wait on the serving stream times out, the stream still runs what was queued:
// copies into the load ring and the device maps. Nothing it touches may be freed before it has.
TEST_CASE("state: a constructor whose serving-stream wait times out fails cleanly; later writes hit live memory") {
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    auto world = comm::make_loopback_world(2);
    auto store = comm::make_memory_store();
    auto r = make_model(0, 2);
    gate g;
    r.stream->wait(g.event());
    const auto cfg = loopback_config(use_async, 4, 1000, 30ms);
    CHECK_EPLB_ERROR(eplb_state(params_for(r, 0, cfg, world, store)), errc::timeout, "not complete");
    CHECK(r.dev->releases_waiting() > 0);  // the load and map buffers wait for the stream
    g.open();
    r.stream->synchronize(10s);
    CHECK(r.dev->collect_released() == 0);
  }
}

TEST_CASE("state: step() and stop() after timed-out waits; destroying the state frees nothing the stream still uses") {
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    auto world = comm::make_loopback_world(2);
    auto store = comm::make_memory_store();
    // Due at step 2 (its window's reading then), planned in step 2 (sync) or step 4 (async).
    auto r = make_rank(0, 2, loopback_config(use_async, 4, 8, 50ms), world, store);
    gate g;
    r.stream->wait(g.event());
    // Issue 17: steps do not wait for the stalled stream, except the one that plans from the
    // window (its reading cannot land in time); later ones go on without waiting.
    const int plans_at = use_async ? 2 + load_readback_lag_steps : 2;
    for (int step = 1; step < plans_at; ++step) CHECK_NOTHROW((void)r.state->step());
    CHECK_EPLB_ERROR(r.state->step(), errc::timeout, "not complete");
    for (int step = plans_at + 1; step <= 9; ++step) CHECK_NOTHROW((void)r.state->step());  // reads at step 6
    const auto t0 = std::chrono::steady_clock::now();
    r.state->stop();  // its wait times out as well: no throw, no hang
    CHECK(std::chrono::steady_clock::now() - t0 < 5s);
    CHECK_EPLB_ERROR(r.state->step(), errc::cancelled, "stopped");
    r.state.reset();
    CHECK(r.dev->releases_waiting() > 0);
    g.open();
    r.stream->synchronize(10s);  // the queued load readings and map copies run into memory still allocated
    CHECK(r.dev->collect_released() == 0);
  }
}

namespace {

std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

// Runs `steps` steps on 4 loopback ranks with a hot expert that moves every step, so most
// rebalances move layers. Rank 0 samples the store's size every `sample` steps; returns the largest
// and how many rebalances rank 0 finished.
struct long_run {
  comm::store_usage most;
  std::int64_t rebalances = 0;
  std::size_t rss_growth = 0;  // after the first tenth of the steps
};

long_run run_steps(const config& cfg, int steps, int sample, const std::shared_ptr<comm::store>& store) {
  const int ranks = 4;
  auto world = comm::make_loopback_world(ranks);
  long_run out;
  std::size_t rss_early = 0;
  on_ranks(ranks, [&](int rank) {
    auto r = make_rank(rank, ranks, cfg, world, store);
    int finished = 0;
    for (int step = 0; step < steps; ++step) {
      // Async: a forward pass stand-in, so the background's work spans a few steps (before issue
      // 17, step() took about this long itself, draining its per-step load copies).
      if (cfg.use_async) std::this_thread::sleep_for(300us);
      for (int l = 0; l < 4; ++l) r.state->record_load(l, skewed_counts(16, step, l + step, rank));
      finished += r.state->step().rebalance_finished ? 1 : 0;
      if (rank != 0) continue;
      if (step == steps / 10) rss_early = resident_bytes();
      if (std::getenv("EPLB_RSS_TRACE") && step % (steps / 20) == 0) {
        MESSAGE(fmt::format("step {} rss {} KB", step, resident_bytes() / 1024));
      }
      if (step % sample != 0) continue;
      const auto u = store->usage();
      out.most.keys = std::max(out.most.keys, u.keys);
      out.most.bytes = std::max(out.most.bytes, u.bytes);
    }
    // Every rank drains in the same step (a peer that stops mid-rebalance is an error on the others).
    r.state->drain();
    for (int extra = 0; extra < 10'000 && r.state->stats().rebalance_in_flight; ++extra) {
      if (cfg.use_async) std::this_thread::sleep_for(300us);
      finished += r.state->step().rebalance_finished ? 1 : 0;
    }
    CHECK_FALSE(r.state->stats().rebalance_in_flight);
    r.state->stop();
    if (rank == 0) out.rebalances = finished;
    return 0;
  });
  const auto rss_late = resident_bytes();
  out.rss_growth = rss_late > rss_early ? rss_late - rss_early : 0;
  return out;
}

}  // namespace

TEST_CASE("long runs: after 10,000 sync and 200+ async rebalances the store holds what two rounds need") {
  // EPLB_STRESS_SCALE (CI's sanitizer runs: 0.3) scales the steps; unscaled, 10,000 sync rebalances.
  const char* scale_text = std::getenv("EPLB_STRESS_SCALE");
  const double scale = scale_text != nullptr ? std::clamp(std::atof(scale_text), 0.01, 1.0) : 1.0;
  const auto scaled = [&](int n) { return static_cast<int>(n * scale); };
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    auto store = comm::make_memory_store();
    auto cfg = loopback_config(use_async, 4, use_async ? 2 : 1, 10s);
    cfg.commit_lag_steps = 1;
    const auto run = run_steps(cfg, scaled(use_async ? 6'000 : 10'000), 7, store);
    const auto end = store->usage();
    MESSAGE(
        fmt::format("{}: {} rebalances; store at most {} keys / {} bytes, at the end {} keys / {} bytes; resident "
                    "memory grew {} KB after the first tenth",
                    use_async ? "async" : "sync", run.rebalances, run.most.keys, run.most.bytes, end.keys, end.bytes,
                    run.rss_growth / 1024));
    CHECK(run.rebalances >= scaled(use_async ? 200 : 10'000));
    // Unbounded, the store would hold tens of thousands of keys here (one sum and several votes per
    // rebalance and rank); bounded, a few rounds' worth.
    CHECK(run.most.keys <= 120);
    CHECK(run.most.bytes <= 64 * 1024);
    CHECK(end.keys <= 120);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
    CHECK(run.rss_growth <= 8U << 20);  // sanitizers keep freed memory in quarantine: not measured there
#endif
  }
}

TEST_CASE("min_improvement: a placement that is not better enough moves nothing and is reported as skipped") {
  const int ranks = 4;
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    auto world = comm::make_loopback_world(ranks);
    auto store = comm::make_memory_store();
    // The load is uniform: every placement is perfectly balanced, none is strictly better.
    auto cfg = loopback_config(use_async, 10, 40, 10s);
    const auto results = on_ranks(ranks, [&](int rank) {
      auto r = make_rank(rank, ranks, cfg, world, store);
      // The first rebalance may improve on the round-robin start; after it the load (5 tokens a
      // slot) gives every plan the same balancedness, so none is strictly better.
      std::optional<matrix<expert_id>> after_first;
      std::uint64_t bytes_after_first = 0;
      int skipped = 0, later = 0;
      for (int step = 0; step < 300; ++step) {
        for (int l = 0; l < 4; ++l) r.state->record_load(l, std::vector<std::int64_t>(16, 5));
        // Async: give the background time to plan, as serving steps do (under the sanitizers a
        // loop that never pauses saw one rebalance end in 300 steps).
        if (use_async) std::this_thread::sleep_for(1ms);
        const auto rep = r.state->step();
        if (!rep.rebalance_finished) continue;
        if (!after_first) {
          after_first = r.state->maps().phy2log();
          bytes_after_first = r.state->stats().bytes_moved;
          continue;
        }
        ++later;
        skipped += rep.rebalance_skipped ? 1 : 0;
      }
      r.state->stop();
      const auto& m = r.state->stats();
      CHECK(later >= 4);
      CHECK(skipped == later);
      CHECK(m.rebalances_skipped >= skipped);
      CHECK(m.bytes_moved == bytes_after_first);
      REQUIRE(after_first);
      CHECK(r.state->maps().phy2log() == *after_first);
      return m.rebalances_skipped;
    });
    for (const auto n : results) CHECK(n == results[0]);
  }
  // With -1 every plan is carried out, as vLLM does; a skewed load is rebalanced under the default.
  CHECK(config::from_json(R"({"min_improvement": -1})").min_improvement == -1.0);
  CHECK(config{}.min_improvement == 0.0);
}

// Issue 17 item 2: stop() (and the destructor) returns within a bound well under a second whatever
// the state: before a rebalance, while it plans, mid-transfer, mid-agreement, after peers stopped
// first, with a peer that went silent. 4 loopback ranks (threads) run short epochs of a tiny model
// with a rebalance every few steps, in sync and async mode, and stop at random moments; every
// stop() is timed, the worst must stay under stop_bound, and every live slot must still hold its
// mapped expert's bytes. A rank that stops first is announced: peers waiting on it fail with
// errc::peer_failure naming it, long before the timeout.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <future>
#include <mutex>
#include <random>
#include <thread>

#include "eplb/comm/communicator.hpp"
#include "eplb/state.hpp"
#include "on_ranks.hpp"
#include "runtime/stoppable_store.hpp"
#include "tools/exchange.hpp"

using namespace eplb;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr int ranks = 4;
constexpr auto timeout = 1500ms;    // every wait of a rebalance; stop() must not depend on it
constexpr auto stop_bound = 500ms;  // the promise: every stop() within this

enum class how { together, one_first, silent_peer };

std::string_view name(how h) {
  switch (h) {
    case how::together:
      return "together";
    case how::one_first:
      return "one_first";
    case how::silent_peer:
      return "silent_peer";
  }
  return "?";
}

struct trial {
  int index;
  bool use_async;
  how kind;
  int victim;         // one_first: stops first; silent_peer: stops stepping (no stop()) until the others end
  int stop_step;      // together: every rank; otherwise the victim's
  int linger[ranks];  // steps the others run on after the victim's moment (unless a step fails first)
  std::uint64_t seed;
};

struct rank_result {
  double stop_ms = 0;
  std::string error;  // the first step() error, if any
  errc code = errc::internal;
  clock_type::time_point error_at{};
  clock_type::time_point stop_began{};
  std::string broken;  // a live slot that does not hold its mapped expert's bytes
};

std::vector<std::int64_t> counts(int slots, int step, int rank) {
  std::vector<std::int64_t> c(static_cast<std::size_t>(slots));
  const int phase = step / 5;  // hot experts move, so every rebalance moves something
  for (int s = 0; s < slots; ++s)
    c[static_cast<std::size_t>(s)] = ((s + phase) % slots < 3 ? 60 : 1) + (step + rank + s) % 4;
  return c;
}

class trial_run {
 public:
  explicit trial_run(const trial& t)
      : t_(t), world_(comm::make_loopback_world(ranks)), store_(comm::make_memory_store()) {}

  rank_result run_rank(int rank) {
    auto dev = device::make_host_device({.max_delay = 1ms, .seed = t_.seed + static_cast<std::uint64_t>(rank)});
    auto stream = dev->create_stream();
    tools::exchange_config shape_cfg{
        .ranks = ranks, .layers = 4, .experts = 12, .redundant = 4, .tensor_bytes = {4096, 512}};
    const auto start = tools::round_placement(shape_cfg, 0, {});
    tools::pattern_model model(tools::pattern_shape(shape_cfg), rank, *dev, *stream, start, 10s);
    state_params p;
    p.cfg.use_async = t_.use_async;
    p.cfg.communicator = "loopback";
    p.cfg.num_redundant_experts = 4;
    p.cfg.window_size = 4;
    p.cfg.step_interval = 6;
    p.cfg.commit_lag_steps = 2;
    p.cfg.timeout = timeout;
    p.model = {model.shape(), 2, 1};
    p.rank = rank;
    p.dev = dev.get();
    p.serving_stream = stream.get();
    p.weights = model.weights();
    p.store = store_;
    p.comm_setup.world = world_;
    p.log = [](std::string_view) {};
    auto state = std::make_unique<eplb_state>(std::move(p));
    rank_result out;
    serve(rank, *state, out);
    const auto t0 = clock_type::now();
    out.stop_began = t0;
    state->stop();
    out.stop_ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
    if (rank == t_.victim && t_.kind != how::together) victim_stopped_ = true;
    for (int l = 0; l < 4 && out.broken.empty(); ++l) out.broken = model.mismatch(l, state->maps().phy2log(l), rank);
    // The destructor is part of the promise too.
    const auto d0 = clock_type::now();
    state.reset();
    out.stop_ms += std::chrono::duration<double, std::milli>(clock_type::now() - d0).count();
    if (rank != t_.victim || t_.kind == how::together) others_done_.fetch_add(1);
    return out;
  }

 private:
  // Steps until this rank's moment; a step() that fails ends it early (the rank then stops).
  void serve(int rank, eplb_state& state, rank_result& out) {
    std::mt19937_64 rng(t_.seed * 31 + static_cast<std::uint64_t>(rank));
    const bool victim = rank == t_.victim && t_.kind != how::together;
    for (int step = 0;; ++step) {
      if (t_.kind == how::together && step == t_.stop_step) return;
      if (victim && step == t_.stop_step) {
        if (t_.kind == how::silent_peer) {
          // Silent (a stalled process): no step, no stop(), until every other rank has stopped.
          while (others_done_.load() < ranks - 1) std::this_thread::sleep_for(1ms);
        }
        return;
      }
      if (!victim && t_.kind != how::together && victim_stopped_or_silent(step) &&
          step >= t_.stop_step + t_.linger[rank]) {
        return;
      }
      for (int l = 0; l < 4; ++l) state.record_load(l, counts(16, step, rank));
      try {
        (void)state.step();
      } catch (const error& e) {
        out.error = e.what();
        out.code = e.code();
        out.error_at = clock_type::now();
        return;
      }
      if (rng() % 4 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 1500));
    }
  }

  // The others run on past the victim's step; they do not wait for the victim itself.
  [[nodiscard]] bool victim_stopped_or_silent(int step) const { return step >= t_.stop_step; }

  trial t_;
  std::shared_ptr<comm::loopback_world> world_;
  std::shared_ptr<comm::store> store_;
  std::atomic<int> others_done_{0};
  std::atomic<bool> victim_stopped_{false};
};

// "rank Q" in `text`, not the start of a longer number.
bool names(const std::string& text, int q) {
  const auto what = fmt::format("rank {}", q);
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) {
    const auto after = at + what.size();
    if (after == text.size() || std::isdigit(static_cast<unsigned char>(text[after])) == 0) return true;
  }
  return false;
}

// one_first: a rank that failed must name a rank that had begun to stop by then (the victim, or a
// rank that stopped after failing itself), and must have heard within half the timeout of the
// first stop: told, not timed out.
void check_told(const std::vector<rank_result>& results, int r) {
  const auto& res = results[static_cast<std::size_t>(r)];
  if (res.error.empty()) return;
  CHECK(res.code == errc::peer_failure);
  clock_type::time_point first_stop = clock_type::time_point::max();
  bool named = false;
  for (int q = 0; q < ranks; ++q) {
    const auto& other = results[static_cast<std::size_t>(q)];
    if (q == r || other.stop_began > res.error_at) continue;
    first_stop = std::min(first_stop, other.stop_began);
    named |= names(res.error, q);
  }
  CHECK(named);
  CHECK(res.error_at - first_stop < timeout / 2);
}

trial make_trial(int index, std::mt19937_64& rng) {
  trial t{};
  t.index = index;
  t.use_async = index % 2 == 0;
  t.kind = static_cast<how>(index / 2 % 3);
  t.victim = static_cast<int>(rng() % ranks);
  t.stop_step = 2 + static_cast<int>(rng() % 40);
  for (int& l : t.linger) l = static_cast<int>(rng() % 25);
  t.seed = rng();
  return t;
}

}  // namespace

TEST_CASE("stop() is bounded at random moments: 4 loopback ranks, sync and async, peers stopped first or silent") {
  const int trials = 36;  // x 4 ranks: 144 stops
  std::mt19937_64 rng(20261202);
  std::vector<double> stops;
  double worst = 0;
  std::string worst_where;
  for (int i = 0; i < trials; ++i) {
    const auto t = make_trial(i, rng);
    CAPTURE(t.index);
    CAPTURE(t.use_async);
    CAPTURE(name(t.kind));
    CAPTURE(t.stop_step);
    CAPTURE(t.victim);
    trial_run run(t);
    const auto results = eplb::testing::on_ranks(ranks, [&](int rank) { return run.run_rank(rank); });
    for (int r = 0; r < ranks; ++r) {
      const auto& res = results[static_cast<std::size_t>(r)];
      CAPTURE(r);
      CAPTURE(res.error);
      stops.push_back(res.stop_ms);
      if (res.stop_ms > worst) {
        worst = res.stop_ms;
        worst_where = fmt::format("trial {} ({}, {}, step {}) rank {}", t.index, t.use_async ? "async" : "sync",
                                  name(t.kind), t.stop_step, r);
      }
      CHECK(res.stop_ms < std::chrono::duration<double, std::milli>(stop_bound).count());
      CHECK_MESSAGE(res.broken.empty(), res.broken);
      if (t.kind == how::one_first && r != t.victim) check_told(results, r);
    }
  }
  std::sort(stops.begin(), stops.end());
  const double p99 = stops[std::min(stops.size() - 1, stops.size() * 99 / 100)];
  std::fprintf(stderr, "stop bound: %zu stops, worst %.1f ms (%s), p99 %.1f ms, median %.1f ms\n", stops.size(), worst,
               worst_where.c_str(), p99, stops[stops.size() / 2]);
  CHECK(stops.size() >= 100);
}

// communicator::abort() from another thread: the rank's waits end at once with errc::cancelled,
// and its peer, waiting for a message that never comes, hears that the rank is stopping.
TEST_CASE("communicator::abort ends this rank's waits and tells its peer (loopback)") {
  auto world = comm::make_loopback_world(2);
  std::vector<std::unique_ptr<comm::communicator>> comms;
  for (int r = 0; r < 2; ++r) {
    comms.push_back(comm::make_communicator(comm::backend::loopback,
                                            {.rank = r, .size = 2, .world = world, .opts = {.timeout = 10s}}));
  }
  std::vector<std::byte> in0(64), in1(64);
  comms[0]->add_recv(in0, 1);  // rank 1 never sends
  comms[1]->add_recv(in1, 0);  // rank 0 never sends either
  const auto t0 = clock_type::now();
  std::thread aborter([&] {
    std::this_thread::sleep_for(50ms);
    comms[0]->abort("test stop");
  });
  std::string e0, e1;
  errc c0 = errc::internal, c1 = errc::internal;
  auto peer = std::async(std::launch::async, [&] {
    try {
      comms[1]->execute();
    } catch (const error& e) {
      e1 = e.what();
      c1 = e.code();
    }
  });
  try {
    comms[0]->execute();
  } catch (const error& e) {
    e0 = e.what();
    c0 = e.code();
  }
  peer.get();
  aborter.join();
  CHECK(clock_type::now() - t0 < 2s);
  CHECK(c0 == errc::cancelled);
  CHECK(e0.find("aborted (test stop)") != std::string::npos);
  CHECK(c1 == errc::peer_failure);
  CHECK(e1.find("peer rank 0 is stopping (test stop)") != std::string::npos);
  // Later batches fail at once, naming the abort.
  comms[0]->add_send(in0, 1);
  try {
    comms[0]->execute();
    FAIL("execute() after abort() did not throw");
  } catch (const error& e) {
    CHECK(e.code() == errc::cancelled);
    CHECK(std::string(e.what()).find("aborted (test stop)") != std::string::npos);
  }
}

// The store a re-made communicator meets its peers through: a wait ends with errc::cancelled once
// the state stops, and the barrier's polling (add) is refused then.
TEST_CASE("stoppable store: a wait ends at the stop; operations are refused after it") {
  std::stop_source stop;
  auto s = runtime::make_stoppable_store(comm::make_memory_store(), stop.get_token());
  s->set("there", "1");
  CHECK(s->get("there", 10s) == "1");
  const auto t0 = clock_type::now();
  std::jthread stopper([&] {
    std::this_thread::sleep_for(100ms);
    stop.request_stop();
  });
  std::string what;
  try {
    (void)s->get("never", 10s);
  } catch (const error& e) {
    CHECK(e.code() == errc::cancelled);
    what = e.what();
  }
  CHECK(what.find("store: stopped (key \"never\")") != std::string::npos);
  CHECK(clock_type::now() - t0 < 2s);
  try {
    (void)s->add("barrier", 1);
    FAIL("add() after the stop did not throw");
  } catch (const error& e) {
    CHECK(e.code() == errc::cancelled);
  }
}

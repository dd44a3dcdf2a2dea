// The coroutine pieces of the async runtime, driven on an io_context the test owns: events completed
// by hand, run until idle (poll() == 0), and the exact order of what happens: the event await with
// its timeout, the staging ring's accounting, and a whole rebalance (layer staged, area reused only
// after the serving read, failures propagated, stop() cancelling a waiting rebalance).
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "check_error.hpp"
#include "device/event_state.hpp"
#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/core/placement.hpp"
#include "on_ranks.hpp"
#include "runtime/async_runtime.hpp"
#include "runtime/awaitables.hpp"
#include "runtime/background_threads.hpp"
#include "runtime/blocking_pool.hpp"
#include "runtime/commit_vote.hpp"
#include "runtime/cpu_group.hpp"
#include "tools/exchange.hpp"
#include "util/asio.hpp"

using namespace eplb;
using namespace std::chrono_literals;

namespace {

// What a spawned coroutine did: finished or not, its failure, its value.
struct probe {
  bool done = false;
  std::exception_ptr failure;
  int value = -1;
};

void spawn(asio::io_context& io, asio::awaitable<void> a, std::shared_ptr<probe> p) {
  asio::co_spawn(io, std::move(a), [p](std::exception_ptr e) {
    p->done = true;
    p->failure = e;
  });
}

void spawn(asio::io_context& io, asio::awaitable<int> a, std::shared_ptr<probe> p) {
  asio::co_spawn(io, std::move(a), [p](std::exception_ptr e, int v) {
    p->done = true;
    p->failure = e;
    p->value = v;
  });
}

// An event that the test completes by hand.
struct manual_event {
  std::shared_ptr<device::detail::event_state> state = std::make_shared<device::detail::event_state>();
  [[nodiscard]] device::event event() const { return device::event(state); }
  void complete() const { state->complete(nullptr); }
  void fail(errc code, const std::string& what) const { state->complete(std::make_exception_ptr(error(code, what))); }
};

// The failure of a finished coroutine as "code: message" ("" when it succeeded).
std::string failure_of(const std::exception_ptr& e) {
  if (!e) return "";
  try {
    std::rethrow_exception(e);
  } catch (const error& x) {
    return fmt::format("{}: {}", to_string(x.code()), x.what());
  } catch (const std::exception& x) {
    return fmt::format("other: {}", x.what());
  }
}

// Runs handlers (blocking for the next one, which other threads may post) until `done()` holds;
// false if `limit` passes first.
template <typename Pred>
bool run_until(asio::io_context& io, Pred done, std::chrono::milliseconds limit = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    io.run_one_for(10ms);
  }
  return true;
}

}  // namespace

TEST_CASE("await_event: resumes only when the event completes, posting through the gate") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  manual_event e;
  auto p = std::make_shared<probe>();
  spawn(io, runtime::await_event(io, gate, e.event(), 10s, "layer 3"), p);
  CHECK(io.poll() > 0);   // the coroutine starts and parks on its timer
  CHECK(io.poll() == 0);  // idle: nothing happens until the event does
  CHECK_FALSE(p->done);
  e.complete();  // the callback runs here, inline, and only posts
  CHECK_FALSE(p->done);
  CHECK(io.poll() > 0);
  CHECK(p->done);
  CHECK(failure_of(p->failure).empty());
}

TEST_CASE("await_event: an event already complete resumes at once") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  manual_event e;
  e.complete();
  auto p = std::make_shared<probe>();
  spawn(io, runtime::await_event(io, gate, e.event(), 10s, "x"), p);
  io.poll();
  CHECK(p->done);
  CHECK(failure_of(p->failure).empty());
}

TEST_CASE("await_event: the event's failure is rethrown as it is") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  manual_event e;
  auto p = std::make_shared<probe>();
  spawn(io, runtime::await_event(io, gate, e.event(), 10s, "layer 1"), p);
  io.poll();
  e.fail(errc::device, "injected fault at operation 7");
  io.poll();
  CHECK(p->done);
  CHECK(failure_of(p->failure) == "device: injected fault at operation 7");
}

TEST_CASE("await_event: timeout is errc::timeout naming what timed out; a late completion is harmless") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  manual_event e;
  auto p = std::make_shared<probe>();
  spawn(io, runtime::await_event(io, gate, e.event(), 30ms, "staging layer 2"), p);
  io.poll();
  CHECK_FALSE(p->done);
  CHECK(run_until(io, [&] { return p->done; }));  // the timer fires
  CHECK(failure_of(p->failure) == "timeout: staging layer 2 not done within 30 ms");
  e.complete();  // after the timeout: posts a handler that changes nothing
  CHECK(io.poll() == 1);
  CHECK(failure_of(p->failure) == "timeout: staging layer 2 not done within 30 ms");
}

TEST_CASE("await_event: once the gate is closed a completion posts nothing") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  manual_event e;
  auto p = std::make_shared<probe>();
  spawn(io, runtime::await_event(io, gate, e.event(), 30ms, "layer 0"), p);
  io.poll();
  gate->close();
  e.complete();
  CHECK(io.poll() == 0);  // dropped at the gate
  CHECK_FALSE(p->done);
  CHECK(run_until(io, [&] { return p->done; }));  // only the timeout ends it
  CHECK(failure_of(p->failure) == "timeout: layer 0 not done within 30 ms");
}

TEST_CASE("await_event on host-device events: a stream gated by hand, and a stalled stream") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  SUBCASE("gated") {
    auto dev = device::make_host_device();
    auto s = dev->create_stream();
    manual_event opens;
    s->wait(opens.event());
    auto p = std::make_shared<probe>();
    spawn(io, runtime::await_event(io, gate, s->record(), 10s, "side stream"), p);
    io.poll();
    CHECK_FALSE(p->done);
    opens.complete();  // the stream worker completes the recorded event, which posts here
    CHECK(run_until(io, [&] { return p->done; }));
    CHECK(failure_of(p->failure).empty());
  }
  SUBCASE("stalled") {
    auto dev = device::make_host_device({.stall_at_op = 0});
    auto s = dev->create_stream();
    auto p = std::make_shared<probe>();
    spawn(io, runtime::await_event(io, gate, s->record(), 40ms, "the stalled stream"), p);
    CHECK(run_until(io, [&] { return p->done; }));
    CHECK(failure_of(p->failure) == "timeout: the stalled stream not done within 40 ms");
    gate->close();  // the stream's destructor fails the event; nothing may reach the io_context
  }
}

TEST_CASE("async_wait_report: a cancellation through the slot ends the wait at once; the late report is dropped") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  manual_event e;
  std::function<void(runtime::report_fn)> start = [ev = e.event()](runtime::report_fn r) { ev.notify(std::move(r)); };
  asio::cancellation_signal cancel;
  auto p = std::make_shared<probe>();
  runtime::async_wait_report(io, gate, start, {.what = "layer 4", .timeout = 10s},
                             asio::bind_cancellation_slot(cancel.slot(), [p](std::exception_ptr f) {
                               p->done = true;
                               p->failure = f;
                             }));
  CHECK(io.poll() == 0);  // a plain callback: the wait started at once and is idle
  cancel.emit(asio::cancellation_type::terminal);
  CHECK_FALSE(p->done);  // never inside emit(): the wait completes from a handler of its own
  CHECK(io.poll() > 0);
  CHECK(p->done);
  CHECK(failure_of(p->failure) == "cancelled: layer 4 cancelled");
  e.complete();  // the work ran on: its report posts one handler that changes nothing
  CHECK(io.poll() == 1);
  CHECK(failure_of(p->failure) == "cancelled: layer 4 cancelled");
}

TEST_CASE("async_wait_report: a wait that is not cancellable ends only when the work reports") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  manual_event e;
  std::function<void(runtime::report_fn)> start = [ev = e.event()](runtime::report_fn r) { ev.notify(std::move(r)); };
  asio::cancellation_signal cancel;
  auto p = std::make_shared<probe>();
  runtime::async_wait_report(io, gate, start, {.what = "a blocking job", .cancellable = false},
                             asio::bind_cancellation_slot(cancel.slot(), [p](std::exception_ptr f) {
                               p->done = true;
                               p->failure = f;
                             }));
  cancel.emit(asio::cancellation_type::terminal);
  CHECK(io.poll() == 0);
  CHECK_FALSE(p->done);
  e.fail(errc::transport, "the job's own error");
  CHECK(io.poll() > 0);
  CHECK(failure_of(p->failure) == "transport: the job's own error");
}

TEST_CASE("await_event in a coroutine: cancelling the coroutine ends the device wait with errc::cancelled") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  manual_event e;
  asio::cancellation_signal cancel;
  auto p = std::make_shared<probe>();
  asio::co_spawn(io, runtime::await_event(io, gate, e.event(), 10s, "staging layer 1"),
                 asio::bind_cancellation_slot(cancel.slot(), [p](std::exception_ptr f) {
                   p->done = true;
                   p->failure = f;
                 }));
  io.poll();
  CHECK_FALSE(p->done);
  cancel.emit(asio::cancellation_type::terminal);
  io.poll();
  CHECK(p->done);
  CHECK(failure_of(p->failure) == "cancelled: staging layer 1 cancelled");
  e.complete();
  io.poll();  // the late report: dropped
}

TEST_CASE("poll_event (marks): completes after the event, times out, and ends with errc::cancelled when cancelled") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);
  manual_event e;
  const auto start = [&](std::chrono::milliseconds timeout, asio::cancellation_signal& cancel) {
    auto p = std::make_shared<probe>();
    asio::co_spawn(io, runtime::poll_event(io, e.event(), timeout, "the serving read"),
                   asio::bind_cancellation_slot(cancel.slot(), [p](std::exception_ptr f) {
                     p->done = true;
                     p->failure = f;
                   }));
    return p;
  };
  asio::cancellation_signal cancel;
  auto cancelled = start(10s, cancel);
  io.run_for(3ms);
  CHECK_FALSE(cancelled->done);
  cancel.emit(asio::cancellation_type::terminal);
  CHECK(run_until(
      io, [&] { return cancelled->done; }, 100ms));
  CHECK(failure_of(cancelled->failure) == "cancelled: the serving read cancelled");
  asio::cancellation_signal unused;
  auto slow = start(20ms, unused);
  CHECK(run_until(
      io, [&] { return slow->done; }, 1s));
  CHECK(failure_of(slow->failure) == "timeout: the serving read not done within 20 ms");
  auto done = start(10s, unused);
  e.complete();
  CHECK(run_until(
      io, [&] { return done->done; }, 100ms));
  CHECK(failure_of(done->failure).empty());
}

TEST_CASE("staging ring: oldest free area first, waits for a free area, then for the serving read") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  runtime::staging_ring ring(io, gate, 2, 10s);
  std::vector<std::shared_ptr<probe>> got;
  const auto acquire = [&] {
    got.push_back(std::make_shared<probe>());
    spawn(io, ring.acquire(), got.back());
    io.poll();
    return got.back();
  };
  CHECK(acquire()->value == 0);
  CHECK(acquire()->value == 1);
  CHECK(ring.free_count() == 0);
  auto third = acquire();
  CHECK_FALSE(third->done);  // parked: no area is free
  CHECK(io.poll() == 0);
  // The serving thread hands area 1 back; its read of the area is still running.
  manual_event read1;
  ring.release(1, read1.event());
  io.run_for(5ms);           // polls the read's mark() (poll_event)
  CHECK_FALSE(third->done);  // took area 1, now waits for the read
  CHECK(ring.free_count() == 0);
  read1.complete();
  CHECK(run_until(
      io, [&] { return third->done; }, 100ms));  // within a poll slice (1 ms at most)
  CHECK(third->value == 1);
  CHECK(failure_of(third->failure).empty());
  // Released in the order 1, 0 (reads done): handed out in that order.
  ring.release(1, {});
  ring.release(0, {});
  CHECK(ring.free_count() == 2);
  CHECK(acquire()->value == 1);
  CHECK(acquire()->value == 0);
}

TEST_CASE("staging ring: a failed or slow serving read fails acquire()") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  runtime::staging_ring ring(io, gate, 1, 30ms);
  auto first = std::make_shared<probe>();
  spawn(io, ring.acquire(), first);
  io.poll();
  REQUIRE(first->value == 0);
  manual_event read;
  ring.release(0, read.event());
  auto second = std::make_shared<probe>();
  spawn(io, ring.acquire(), second);
  SUBCASE("failed") {
    io.run_for(5ms);
    CHECK_FALSE(second->done);
    read.fail(errc::device, "serving stream fault");
    CHECK(run_until(
        io, [&] { return second->done; }, 100ms));
    CHECK(failure_of(second->failure) == "device: serving stream fault");
  }
  SUBCASE("slow") {
    CHECK(run_until(io, [&] { return second->done; }));
    CHECK(failure_of(second->failure) == "timeout: the serving stream's read of a staging area not done within 30 ms");
  }
}

TEST_CASE("staging ring: cancel() fails a waiting acquire() with errc::cancelled") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);  // the io_context never stops for lack of work
  auto gate = std::make_shared<runtime::post_gate>(io);
  runtime::staging_ring ring(io, gate, 1, 10s);
  auto first = std::make_shared<probe>();
  spawn(io, ring.acquire(), first);
  auto waiting = std::make_shared<probe>();
  spawn(io, ring.acquire(), waiting);
  io.poll();
  CHECK(first->value == 0);
  CHECK_FALSE(waiting->done);
  ring.cancel("rebalance cancelled by stop()");
  CHECK(ring.cancelled());
  io.poll();
  CHECK(waiting->done);
  CHECK(failure_of(waiting->failure) == "cancelled: rebalance cancelled by stop()");
  // Later acquires with no free area fail at once; a free area is still handed out (the rebalance
  // itself checks for stop() before each layer).
  auto later = std::make_shared<probe>();
  spawn(io, ring.acquire(), later);
  io.poll();
  CHECK(failure_of(later->failure) == "cancelled: rebalance cancelled by stop()");
  ring.release(0, {});
  auto free_one = std::make_shared<probe>();
  spawn(io, ring.acquire(), free_one);
  io.poll();
  CHECK(free_one->value == 0);
}

TEST_CASE("staging ring: reset() frees every area and forgets cancel(); the serving reads are still awaited") {
  asio::io_context io;
  const auto busy = asio::make_work_guard(io);
  auto gate = std::make_shared<runtime::post_gate>(io);
  runtime::staging_ring ring(io, gate, 2, 10s);
  for (int i = 0; i < 2; ++i) spawn(io, ring.acquire(), std::make_shared<probe>());
  io.poll();
  CHECK(ring.free_count() == 0);  // a failed rebalance staged both and never had them committed
  manual_event read0;
  ring.release(0, read0.event());  // area 0 was committed; the serving stream still reads it
  ring.cancel("rebalance abandoned");
  ring.reset();
  CHECK(ring.free_count() == 2);
  CHECK_FALSE(ring.cancelled());
  auto next = std::make_shared<probe>();
  spawn(io, ring.acquire(), next);
  io.run_for(5ms);
  CHECK_FALSE(next->done);  // area 0 first, after its read
  read0.complete();
  CHECK(run_until(
      io, [&] { return next->done; }, 100ms));
  CHECK(next->value == 0);
  CHECK(failure_of(next->failure).empty());
}

namespace {

// One rank (so every move is a local copy through the staging area), a real rearranger, cpu group
// and host streams, and an async_runtime on the test's io_context. The test plays the serving thread.
struct runtime_rig {
  static constexpr int layers = 3;
  static constexpr int experts = 4;
  static constexpr int slots = 6;

  asio::io_context io;
  std::unique_ptr<device::device> dev;
  std::unique_ptr<device::stream> serving;
  std::unique_ptr<device::stream> side;
  exec::model_shape shape;
  placement maps;
  std::unique_ptr<tools::pattern_model> model;
  std::unique_ptr<comm::communicator> comm;
  std::unique_ptr<exec::rearranger> stager;
  runtime::cpu_group group;
  std::unique_ptr<runtime::background_threads> threads;  // the pool's jobs use `group`
  std::unique_ptr<runtime::async_runtime> rt;            // last: stopped and gone before the rest

  /// own_thread: the runtime runs its own io_context on its own thread (as in eplb_state).
  explicit runtime_rig(int areas, std::chrono::milliseconds timeout, device::host_faults faults = {},
                       bool own_thread = false)
      : dev(device::make_host_device(faults)),
        serving(dev->create_stream()),
        side(dev->create_stream()),
        shape(tools::pattern_shape({.ranks = 1,
                                    .layers = layers,
                                    .experts = experts,
                                    .redundant = slots - experts,
                                    .tensor_bytes = {64, 24}})),
        maps(placement::initial(layers, experts, slots, 1)),
        group(comm::make_memory_store(), 0, 1, timeout) {
    model = std::make_unique<tools::pattern_model>(shape, 0, *dev, *serving, maps.phy2log(), timeout);
    comm =
        comm::make_communicator(comm::backend::loopback, {.rank = 0, .size = 1, .world = comm::make_loopback_world(1)});
    stager =
        std::make_unique<exec::rearranger>(shape, 0, *dev, *side, *comm, exec::rearrange_options{.timeout = timeout});
    threads = own_thread ? std::make_unique<runtime::background_threads>()
                         : std::make_unique<runtime::background_threads>(io);
    rt = std::make_unique<runtime::async_runtime>(*threads, *stager, model->weights(), group, *dev, *side, areas,
                                                  timeout);
  }

  // Expert 0 is hot in every layer: the policy gives it the redundant slots.
  runtime::rebalance_inputs inputs() const {
    matrix<double> load(layers, experts);
    for (int l = 0; l < layers; ++l) {
      for (int e = 0; e < experts; ++e)
        load(static_cast<std::size_t>(l), static_cast<std::size_t>(e)) = e == 0 ? 100 : 1;
    }
    return {load, maps.phy2log(), policy_kind::deepseek_default, 1, 1};
  }

  // The serving side of one commit (as eplb_state does it): wait for the staged event, copy the
  // area into the live slots, switch the maps. Returns the area.
  int commit(int layer) {
    const auto ready = rt->get(layer);
    CHECK(ready.staged.layer == layer);
    serving->wait(ready.ready);
    stager->commit_layer(ready.staged, model->weights(), rt->area(ready.area), *serving);
    maps.set_layer(layer, ready.staged.new_row);
    return ready.area;
  }

  // Every local slot of `layer` against the reference bytes of the expert its map names.
  std::string verify(int layer) {
    serving->synchronize(10s);
    const auto reference = model->reference();
    for (int t = 0; t < static_cast<int>(shape.bundle.size()); ++t) {
      const auto bytes = shape.bundle[static_cast<std::size_t>(t)].bytes_per_expert;
      for (int s = 0; s < slots; ++s) {
        const expert_id e = maps.phy2log(layer)[static_cast<std::size_t>(s)];
        if (e < 0) continue;
        if (exec::checksum({model->weights().slot(shape, layer, t, s), bytes}) != reference(layer, e, t)) {
          return fmt::format("layer {} slot {} tensor {}: not expert {}", layer, s, t, e);
        }
      }
    }
    return {};
  }
};

}  // namespace

TEST_CASE("async runtime on the test's io_context: staged in order, an area reused only after the serving read") {
  runtime_rig rig(1, 10s);  // one staging area: layer L+1 waits for the commit of layer L
  auto& rt = *rig.rt;
  rt.start(rig.inputs());
  CHECK(rt.busy());
  CHECK_EPLB_ERROR(rt.start(rig.inputs()), errc::internal, "a rebalance is already running");
  CHECK(rt.staged_layers() == 0);
  // All-reduce (on the blocking worker), policy, then layer 0: copies on the side stream, its event.
  REQUIRE(run_until(rig.io, [&] { return rt.staged_layers() == 1; }));
  REQUIRE(rt.target().has_value());
  const auto target = *rt.target();
  CHECK(target != rig.maps.phy2log());  // bytes really move
  CHECK(rt.global_load().has_value());
  // Layer 0 holds the only area: the coroutine is parked until the serving thread gives it back.
  CHECK(rig.io.poll() == 0);
  CHECK(rt.staged_layers() == 1);
  const int area0 = rig.commit(0);
  CHECK(rig.verify(0).empty());
  manual_event read0;  // the serving stream's read of the area, completed by hand
  rt.release(area0, read0.event());
  CHECK(rig.io.poll() > 0);  // the release: the coroutine takes the area, then waits for the read
  CHECK(rig.io.poll() == 0);
  CHECK(rt.staged_layers() == 1);
  read0.complete();
  REQUIRE(run_until(rig.io, [&] { return rt.staged_layers() == 2; }));
  CHECK(rig.io.poll() == 0);
  CHECK(rt.busy());
  const int area1 = rig.commit(1);
  CHECK(area1 == area0);
  CHECK(rig.verify(1).empty());
  rt.release(area1, rig.serving->record());
  REQUIRE(run_until(rig.io, [&] { return !rt.busy(); }));
  CHECK(rt.staged_layers() == 3);
  CHECK(failure_of(rt.failure()).empty());
  rt.release(rig.commit(2), rig.serving->record());
  CHECK(rig.verify(2).empty());
  CHECK(rig.maps.phy2log() == target);
  rt.stop();
}

TEST_CASE("async runtime: side-stream work not done in time is errc::timeout naming the layer") {
  runtime_rig rig(2, 300ms);
  manual_event opens;
  rig.side->wait(opens.event());  // nothing on the side stream runs until the test says so
  rig.rt->start(rig.inputs());
  REQUIRE(run_until(rig.io, [&] { return !rig.rt->busy(); }));
  CHECK(rig.rt->staged_layers() == 0);
  CHECK(failure_of(rig.rt->failure()) == "timeout: staging layer 0 not done within 300 ms");
  opens.complete();
  rig.rt->stop();
}

TEST_CASE("async runtime: a side-stream failure fails the rebalance; layers staged before it stay") {
  runtime_rig rig(1, 10s);
  auto& rt = *rig.rt;
  rt.start(rig.inputs());
  REQUIRE(run_until(rig.io, [&] { return rt.staged_layers() == 1; }));
  manual_event fault;
  rig.side->wait(fault.event());  // layer 1's side-stream work queues behind this
  const int area0 = rig.commit(0);
  rt.release(area0, rig.serving->record());
  CHECK(rt.busy());
  fault.fail(errc::device, "injected side-stream fault");
  REQUIRE(run_until(rig.io, [&] { return !rt.busy(); }));
  CHECK(failure_of(rt.failure()) == "device: injected side-stream fault");
  CHECK(rt.staged_layers() == 1);
  CHECK(rig.verify(0).empty());
  // Layers 1 and 2 were never committed: their live bytes still hold the initial experts.
  CHECK(rig.verify(1).empty());
  CHECK(rig.verify(2).empty());
  // The next rebalance starts cleanly.
  rt.start(rig.inputs());
  CHECK(rt.staged_layers() == 0);
  CHECK(failure_of(rt.failure()).empty());
  rt.stop();
}

TEST_CASE("async runtime: stop() while the rebalance waits for an area cancels it at once") {
  runtime_rig rig(1, 20s);
  auto& rt = *rig.rt;
  rt.start(rig.inputs());
  REQUIRE(run_until(rig.io, [&] { return rt.staged_layers() == 1; }));
  CHECK(rig.io.poll() == 0);  // parked for an area that is never given back
  const auto t0 = std::chrono::steady_clock::now();
  rt.stop();
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);  // not the 20 s timeout: the wait was woken
  CHECK_FALSE(rt.busy());
  CHECK(failure_of(rt.failure()) == "cancelled: rebalance cancelled by stop()");
  CHECK(rt.staged_layers() == 1);
  rt.stop();  // idempotent
}

TEST_CASE("async runtime: cancel() ends a rebalance waiting for an area; its areas serve the next rebalance") {
  runtime_rig rig(1, 20s);
  auto& rt = *rig.rt;
  rt.start(rig.inputs());
  REQUIRE(run_until(rig.io, [&] { return rt.staged_layers() == 1; }));
  CHECK(rig.io.poll() == 0);  // layer 0 holds the only area; the serving side gives the rebalance up
  CHECK_FALSE(rt.wait_idle(0ms));
  rt.cancel();
  REQUIRE(run_until(
      rig.io, [&] { return !rt.busy(); }, 3s));
  CHECK(rt.wait_idle(0ms));
  CHECK(failure_of(rt.failure()) == "cancelled: rebalance abandoned by the serving side");
  // The next rebalance gets the area that layer 0 of the abandoned one held (never committed).
  rt.start(rig.inputs());
  CHECK(failure_of(rt.failure()).empty());
  CHECK(run_until(
      rig.io, [&] { return rt.staged_layers() == 1; }, 3s));
  rt.release(rig.commit(0), rig.serving->record());
  CHECK(rig.verify(0).empty());
  REQUIRE(run_until(
      rig.io, [&] { return rt.staged_layers() == 2; }, 3s));
  rt.stop();
}

TEST_CASE("async runtime: gone before its stalled side stream; the late completion touches nothing of it") {
  runtime_rig rig(2, 100ms, {}, true);  // its own io_context and thread, as in eplb_state
  manual_event opens;
  rig.side->wait(opens.event());
  rig.rt->start(rig.inputs());
  REQUIRE(rig.rt->wait_idle(10s));
  CHECK(failure_of(rig.rt->failure()) == "timeout: staging layer 0 not done within 100 ms");
  rig.rt.reset();    // stop() waits 100 ms for the side stream, then the runtime and its io_context go
  opens.complete();  // the stream runs on: layer 0's event completes and its callback is dropped
  rig.side->synchronize(10s);
}

// Issue 15: the serving stream reads a committed area after the runtime has gone (a wait timed out,
// or the engine's work ahead of the commit is long); the area stays allocated until it has.
TEST_CASE("async runtime: areas the serving stream still reads outlive the runtime") {
  runtime_rig rig(1, 10s);
  auto& rt = *rig.rt;
  rt.start(rig.inputs());
  REQUIRE(run_until(rig.io, [&] { return rt.staged_layers() == 1; }));
  manual_event engine;  // the engine's forward pass ahead of the commit, still running
  rig.serving->wait(engine.event());
  (void)rig.commit(0);  // queued behind it: reads the area
  rt.stop();            // the rebalance waits for the area, so it ends at once
  rt.release_areas_after(*rig.serving);
  rig.rt.reset();
  CHECK(rig.dev->releases_waiting() > 0);
  engine.complete();
  CHECK(rig.verify(0).empty());  // the commit copied the staged bytes from memory still allocated
  // The area waits for the side stream too (the runtime recorded it as it went): that event
  // completes on the side stream's worker, which may not have run yet on a loaded machine.
  rig.side->synchronize(10s);
  CHECK(rig.dev->collect_released() == 0);
}

namespace {

// Counts the bytes of keys and values that pass through a store (what a TCP store's server moves).
class counting_store final : public comm::store {
 public:
  explicit counting_store(std::shared_ptr<comm::store> inner) : inner_(std::move(inner)) {}
  void set(const std::string& key, const std::string& value) override {
    bytes_ += key.size() + value.size();
    inner_->set(key, value);
  }
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override {
    auto v = inner_->get(key, timeout);
    bytes_ += key.size() + v.size();
    return v;
  }
  std::int64_t add(const std::string& key, std::int64_t delta) override { return inner_->add(key, delta); }
  std::string set_if_absent(const std::string& key, const std::string& value) override {
    return inner_->set_if_absent(key, value);
  }
  void erase(const std::string& key) override { inner_->erase(key); }
  comm::store_usage usage() override { return inner_->usage(); }
  [[nodiscard]] std::uint64_t bytes() const noexcept { return bytes_.load(); }

 private:
  std::shared_ptr<comm::store> inner_;
  std::atomic<std::uint64_t> bytes_{0};
};

// Store traffic of one load sum of a DeepSeek-V3-shaped load (58 layers x 256 experts) on `ranks`
// ranks: the cpu group's, and an all-gather of whole matrices (what it did before), for comparison.
std::pair<std::uint64_t, std::uint64_t> sum_traffic(int ranks) {
  const std::vector<double> load(58 * 256, 1.0);
  auto ours = std::make_shared<counting_store>(comm::make_memory_store());
  auto gather = std::make_shared<counting_store>(comm::make_memory_store());
  std::vector<std::vector<double>> sums(static_cast<std::size_t>(ranks));
  eplb::testing::on_ranks(ranks, [&](int r) {
    runtime::cpu_group group(ours, r, ranks, 20s);
    sums[static_cast<std::size_t>(r)] = group.allreduce_sum(load);
    // The all-gather: every rank posts its matrix and reads every other one.
    gather->set(fmt::format("sum/{}", r), std::string(load.size() * sizeof(double), 'x'));
    for (int p = 0; p < ranks; ++p) {
      if (p != r) (void)gather->get(fmt::format("sum/{}", p), 20s);
    }
    return 0;
  });
  for (const auto& s : sums) {
    CHECK(s.size() == load.size());
    CHECK(std::all_of(s.begin(), s.end(), [&](double v) { return v == ranks; }));
  }
  return {ours->bytes(), gather->bytes()};
}

}  // namespace

TEST_CASE("cpu group: the load sum's store traffic per rank does not grow with the number of ranks") {
  const double matrix_bytes = 58 * 256 * sizeof(double);
  for (const int ranks : {4, 32}) {
    CAPTURE(ranks);
    const auto [ours, gather] = sum_traffic(ranks);
    MESSAGE(
        fmt::format("{} ranks, one DeepSeek-V3 load sum: {:.2f} MB through the store ({:.2f} MB per rank); an "
                    "all-gather of whole matrices {:.2f} MB",
                    ranks, ours / 1e6, ours / 1e6 / ranks, gather / 1e6));
    CHECK(static_cast<double>(ours) / ranks <= 3.2 * matrix_bytes);  // posts it, reads its slices, reads the sums
    CHECK(static_cast<double>(gather) / ranks >= (ranks - 1) * matrix_bytes);
  }
}

// Issue 17: the vote keys of a rebalance whose load sum failed (so forget_previous() never ran
// after it) are deleted by the next successful one, not left behind for good.
TEST_CASE("commit_vote: keys of rebalances whose load sum failed are deleted by the next success") {
  auto store = comm::make_memory_store();
  runtime::commit_vote vote(store, 0, 1, 2s);
  vote.begin(0);
  CHECK(vote.decide(0, 0, nullptr).empty());
  CHECK(vote.decide(1, 0, nullptr).empty());
  vote.settle(0);
  const auto after_first = store->usage().keys;
  CHECK(after_first >= 5);  // two batches (ok, decision) and "ended"
  // Rebalance 1 fails before its sum (so nothing is forgotten) and votes one batch, then aborts.
  vote.begin(1);
  CHECK(vote.decide(0, 0, nullptr).empty());
  vote.abort("the load sum failed");
  vote.settle(1);
  // Rebalance 2's sum succeeds: every earlier rebalance's keys go, rebalance 1's included.
  vote.begin(2);
  vote.forget_previous();
  CHECK(store->usage().keys == 0);
  CHECK(vote.decide(0, 0, nullptr).empty());
  CHECK(store->usage().keys == 2);
  // A later success forgets rebalance 2; nothing accumulates over many rebalances.
  for (int id = 3; id < 200; ++id) {
    vote.begin(id);
    vote.forget_previous();
    CHECK(vote.decide(0, 0, nullptr).empty());
    if (id % 3 == 0) vote.abort("injected");
  }
  CHECK(store->usage().keys <= 3);
}

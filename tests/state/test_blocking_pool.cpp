// The threads of the async mode: the bounded blocking pool (threads only as needed, up to the bound;
// stop() runs what is queued), job chains (in order, one at a time) and the commit agreement on
// them (the rounds of a retired rebalance, stuck waiting for a silent peer, never delay the new ones).
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "check_error.hpp"
#include "eplb/comm/store.hpp"
#include "runtime/agreement.hpp"
#include "runtime/awaitables.hpp"
#include "runtime/background_threads.hpp"
#include "runtime/blocking_pool.hpp"
#include "runtime/cpu_group.hpp"

using namespace eplb;
using namespace std::chrono_literals;

TEST_CASE("blocking pool: threads start as jobs need them, up to the bound; stop() runs what is queued") {
  runtime::blocking_pool pool(2);
  CHECK(pool.threads() == 0);
  std::promise<void> open;
  const auto opened = open.get_future().share();
  std::atomic<int> ran{0};
  for (int i = 0; i < 4; ++i) {
    pool.post([&ran, opened] {
      opened.wait();
      ++ran;
    });
  }
  CHECK(pool.threads() == 2);  // the other two jobs queue
  open.set_value();
  pool.stop();
  CHECK(ran == 4);
  CHECK_EPLB_ERROR(pool.post([] {}), errc::cancelled, "blocking pool: stopped");
  pool.stop();  // idempotent
  CHECK_EPLB_ERROR(runtime::blocking_pool(0), errc::invalid_argument, "at least one thread");
}

TEST_CASE("job chain: in order and one at a time; a blocked chain does not hold up another") {
  runtime::blocking_pool pool(4);
  auto blocked = runtime::job_chain::make(pool);
  std::promise<void> open;
  const auto opened = open.get_future().share();
  blocked->post([opened] { opened.wait(); });
  CHECK_FALSE(blocked->idle());
  auto chain = runtime::job_chain::make(pool);
  std::mutex mutex;
  std::vector<int> order;
  int running = 0;
  int most = 0;
  for (int i = 0; i < 50; ++i) {
    chain->post([&, i] {
      {
        std::lock_guard lock(mutex);
        most = std::max(most, ++running);
        order.push_back(i);
      }
      std::this_thread::yield();
      std::lock_guard lock(mutex);
      --running;
    });
  }
  chain->wait_idle();  // while `blocked` still waits
  CHECK_FALSE(blocked->idle());
  CHECK(most == 1);
  REQUIRE(order.size() == 50);
  for (int i = 0; i < 50; ++i) CHECK(order[static_cast<std::size_t>(i)] == i);
  open.set_value();
  blocked->wait_idle();
  CHECK(blocked->idle());
}

TEST_CASE("commit agreement: a retired rebalance's round, waiting for a silent peer, does not delay the next") {
  const auto timeout = 3s;
  runtime::background_threads threads;
  auto store = comm::make_memory_store();
  runtime::cpu_group group0(store, 0, 2, timeout);
  runtime::cpu_group group1(store, 1, 2, timeout);
  runtime::lagged_min agree0(group0, threads.pool(), 1, timeout);
  runtime::lagged_min agree1(group1, threads.pool(), 1, timeout);
  // Rebalance 1: rank 0 posts its first round; rank 1 never does, so that round waits out the
  // timeout on its chain (the destructor waits for it at the end). Both ranks start rebalance 2.
  agree0.begin(1);
  CHECK_FALSE(agree0.step(5).has_value());
  const auto t0 = std::chrono::steady_clock::now();
  agree0.begin(2);
  agree1.begin(2);
  CHECK_FALSE(agree0.step(3).has_value());
  CHECK_FALSE(agree1.step(7).has_value());
  CHECK(agree0.step(9) == std::optional<std::int64_t>(3));
  CHECK(agree1.step(9) == std::optional<std::int64_t>(3));
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);  // not behind the retired round's 3 s
  CHECK(threads.pool().threads() >= 2);               // the retired round holds a thread of its own
}

TEST_CASE("commit agreement: with lag 2 the first two steps decide nothing, then rounds come back in order") {
  runtime::background_threads threads;
  runtime::cpu_group group(comm::make_memory_store(), 0, 1, 10s);
  runtime::lagged_min agree(group, threads.pool(), 2, 10s);
  agree.begin(1);
  CHECK_FALSE(agree.step(4).has_value());
  CHECK_FALSE(agree.step(5).has_value());
  CHECK(agree.step(6) == std::optional<std::int64_t>(4));
  CHECK(agree.step(7) == std::optional<std::int64_t>(5));
  CHECK_EPLB_ERROR(runtime::lagged_min(group, threads.pool(), -1, 10s), errc::invalid_argument, "lag must be >= 0");
}

TEST_CASE(
    "background threads: the io thread runs what is posted; stop() lets queued pool jobs run, then refuses more") {
  runtime::background_threads threads;
  CHECK(threads.has_io_thread());
  std::promise<std::thread::id> ran_on;
  threads.gate()->post([&ran_on] { ran_on.set_value(std::this_thread::get_id()); });
  CHECK(ran_on.get_future().get() != std::this_thread::get_id());
  std::atomic<int> jobs{0};
  for (int i = 0; i < 3; ++i) {
    threads.pool().post([&jobs] {
      std::this_thread::sleep_for(20ms);
      ++jobs;
    });
  }
  threads.stop();
  CHECK(jobs == 3);
  CHECK_EPLB_ERROR(threads.pool().post([] {}), errc::cancelled, "blocking pool: stopped");
  threads.stop();  // idempotent
}

TEST_CASE("background threads: a serial executor runs its jobs in order, one at a time, on the pool") {
  runtime::background_threads threads;
  const auto run = threads.serial_executor();
  std::mutex mutex;
  std::vector<int> order;
  const auto caller = std::this_thread::get_id();
  bool on_caller = false;
  int running = 0;
  int most = 0;
  std::promise<void> last;
  for (int i = 0; i < 20; ++i) {
    run([&, i] {
      {
        std::lock_guard lock(mutex);
        most = std::max(most, ++running);
        order.push_back(i);
        on_caller = on_caller || std::this_thread::get_id() == caller;
      }
      std::this_thread::yield();
      std::lock_guard lock(mutex);
      --running;
    });
  }
  run([&last] { last.set_value(); });
  last.get_future().wait();
  std::lock_guard lock(mutex);
  CHECK(most == 1);
  CHECK_FALSE(on_caller);
  REQUIRE(order.size() == 20);
  for (int i = 0; i < 20; ++i) CHECK(order[static_cast<std::size_t>(i)] == i);
}

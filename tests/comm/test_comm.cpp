// In-process communicator tests: loopback conformance (threads), error cases, stores.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <algorithm>
#include <array>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <future>
#include <thread>

#include "check_error.hpp"
#include "comm/conformance.hpp"
#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "on_ranks.hpp"

using namespace eplb;
using eplb::testing::on_ranks;
using namespace std::chrono_literals;

namespace {

comm::setup loopback_setup(const std::shared_ptr<comm::loopback_world>& world, int rank, int size,
                           std::chrono::milliseconds timeout = 10s) {
  comm::setup s;
  s.rank = rank;
  s.size = size;
  s.world = world;
  s.opts.timeout = timeout;
  return s;
}

}  // namespace

TEST_CASE("loopback conformance on 2, 3 and 4 ranks, plain and stream-ordered") {
  for (int size : {2, 3, 4}) {
    for (bool staged : {false, true}) {
      CAPTURE(size);
      CAPTURE(staged);
      auto world = comm::make_loopback_world(size);
      const auto results = on_ranks(size, [&](int rank) {
        auto dev =
            device::make_host_device({.max_delay = staged ? 1ms : 0ms, .seed = 5U + static_cast<unsigned>(rank)});
        auto stream = dev->create_stream();
        auto c = comm::make_communicator(comm::backend::loopback, loopback_setup(world, rank, size));
        return testing::run_conformance(*c, *dev, staged ? stream.get() : nullptr,
                                        {.seed = static_cast<std::uint64_t>(size), .rounds = 4});
      });
      for (const auto& r : results) CHECK_MESSAGE(r.empty(), r);
    }
  }
}

TEST_CASE("communicator argument errors") {
  auto world = comm::make_loopback_world(2);
  auto c = comm::make_communicator(comm::backend::loopback, loopback_setup(world, 0, 2));
  std::byte b[4] = {};
  CHECK_EPLB_ERROR(c->add_send(b, 0), errc::invalid_argument, "rank 0 cannot exchange with itself");
  CHECK_EPLB_ERROR(c->add_recv(b, 2), errc::invalid_argument, "peer 2 is out of range for 2 ranks");
  CHECK_EPLB_ERROR(c->add_send(b, -1), errc::invalid_argument, "peer -1 is out of range");
  CHECK(c->pending() == 0);
  CHECK_EPLB_ERROR(comm::parse_backend("mpi"), errc::invalid_argument, "unknown backend \"mpi\"");
  CHECK_EPLB_ERROR(comm::make_communicator(comm::backend::loopback, comm::setup{}), errc::invalid_argument,
                   "setup.world is missing");
  CHECK(comm::parse_backend("stateless_nccl") == comm::backend::stateless_nccl);
  CHECK(comm::parse_backend("cuda_ipc") == comm::backend::cuda_ipc);
  CHECK(comm::to_string(comm::backend::cuda_ipc) == "cuda_ipc");
}

TEST_CASE("discarded operations never join a later batch") {
  auto world = comm::make_loopback_world(2);
  auto c0 = comm::make_communicator(comm::backend::loopback, loopback_setup(world, 0, 2));
  auto c1 = comm::make_communicator(comm::backend::loopback, loopback_setup(world, 1, 2));
  std::array<std::byte, 4> stale{}, fresh{}, got{};
  stale.fill(std::byte{1});
  fresh.fill(std::byte{2});
  c0->add_send(stale, 1);  // a batch whose posting failed half-way
  c0->add_send(stale, 1);
  c0->discard_pending();
  CHECK(c0->pending() == 0);
  c0->add_send(fresh, 1);
  c1->add_recv(got, 0);
  auto other = std::async(std::launch::async, [&] { c1->execute(); });
  c0->execute();
  other.get();
  CHECK(got == fresh);
}

// Issue 15: a timeout of milliseconds::max() once overflowed the deadline (an instant timeout).
TEST_CASE("loopback and stores: the largest timeouts wait instead of overflowing") {
  auto world = comm::make_loopback_world(2);
  const auto results = on_ranks(2, [&](int rank) -> std::string {
    auto c = comm::make_communicator(comm::backend::loopback,
                                     loopback_setup(world, rank, 2, std::chrono::milliseconds::max()));
    std::vector<std::byte> buf(64, std::byte{static_cast<unsigned char>(rank + 1)});
    if (rank == 0) {
      std::this_thread::sleep_for(50ms);  // rank 1 waits on a deadline computed from the maximum
      c->add_send(buf, 1);
    } else {
      c->add_recv(buf, 0);
    }
    c->execute();
    return rank == 1 && buf[0] != std::byte{1} ? "wrong bytes" : "";
  });
  CHECK(results[0].empty());
  CHECK(results[1].empty());
  auto s = comm::make_memory_store();
  std::thread setter([&] {
    std::this_thread::sleep_for(30ms);
    s->set("k", "v");
  });
  CHECK(s->get("k", std::chrono::milliseconds::max()) == "v");
  setter.join();
}

TEST_CASE("loopback: size mismatch, silent peer and dead peer are clear errors") {
  auto world = comm::make_loopback_world(2);
  SUBCASE("receive larger than the send") {
    const auto results = on_ranks(2, [&](int rank) -> std::string {
      auto c = comm::make_communicator(comm::backend::loopback, loopback_setup(world, rank, 2, 2s));
      std::vector<std::byte> buf(rank == 0 ? 8 : 16);
      if (rank == 0) c->add_send(buf, 1);
      if (rank == 1) c->add_recv(buf, 0);
      try {
        c->execute();
      } catch (const error& e) {
        return e.what();
      }
      return "no error";
    });
    CHECK(results[0].find("rank 1 expected 16 bytes from rank 0, which sent 8") != std::string::npos);
    CHECK(results[1].find("rank 1 expected 16 bytes from rank 0, which sent 8") != std::string::npos);
  }
  SUBCASE("silent peer times out naming it") {
    auto c = comm::make_communicator(comm::backend::loopback, loopback_setup(world, 0, 2, 200ms));
    std::vector<std::byte> buf(8);
    c->add_recv(buf, 1);
    CHECK_EPLB_ERROR(c->execute(), errc::timeout, "no message from rank 1 within 200 ms");
  }
  SUBCASE("dead peer fails fast naming it") {
    auto c = comm::make_communicator(comm::backend::loopback, loopback_setup(world, 0, 2, 10s));
    std::vector<std::byte> buf(8);
    c->add_send(buf, 1);
    std::thread killer([&] {
      std::this_thread::sleep_for(50ms);
      comm::mark_dead(*world, 1);
    });
    const auto start = std::chrono::steady_clock::now();
    CHECK_EPLB_ERROR(c->execute(), errc::peer_failure, "peer rank 1 died");
    killer.join();
    CHECK(std::chrono::steady_clock::now() - start < 5s);
  }
}

TEST_CASE("execute_async completes on the worker and reports failures") {
  auto world = comm::make_loopback_world(2);
  const auto results = on_ranks(2, [&](int rank) {
    auto c = comm::make_communicator(comm::backend::loopback, loopback_setup(world, rank, 2));
    std::vector<std::byte> buf(64, std::byte{static_cast<unsigned char>(rank + 1)});
    if (rank == 0) c->add_send(buf, 1);
    if (rank == 1) c->add_recv(buf, 0);
    std::promise<std::exception_ptr> done;
    c->execute_async([&](std::exception_ptr e) { done.set_value(e); });
    auto f = done.get_future();
    REQUIRE(f.wait_for(10s) == std::future_status::ready);
    return f.get() == nullptr && buf[63] == std::byte{1};
  });
  CHECK(results[0]);
  CHECK(results[1]);
}

TEST_CASE("stores: memory, file, tcp and prefix") {
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("eplb-store-{}", ::getpid());
  comm::tcp_store_server server("127.0.0.1", 0);
  std::vector<std::shared_ptr<comm::store>> stores{comm::make_memory_store(), comm::make_file_store(dir.string()),
                                                   comm::make_tcp_store("127.0.0.1", server.port(), 5s)};
  for (auto& s : stores) {
    s->set("a/b", std::string("x\0y", 3));
    CHECK(s->get("a/b", 1s) == std::string("x\0y", 3));
    CHECK(s->add("n", 2) == 2);
    CHECK(s->add("n", 3) == 5);
    CHECK_EPLB_ERROR(s->get("missing", 50ms), errc::timeout, "\"missing\"");
    // A get that waits is answered by a later set from another thread.
    std::thread setter([&] {
      std::this_thread::sleep_for(30ms);
      s->set("late", "v");
    });
    auto other = s;
    CHECK(other->get("late", 5s) == "v");
    setter.join();
    auto p = comm::make_prefix_store(s, "run1");
    p->set("k", "1");
    CHECK(s->get("run1/k", 1s) == "1");
    // Barrier over threads.
    on_ranks(3, [&](int) {
      comm::store_barrier(*s, "barrier", 3, 5s);
      return 0;
    });
    CHECK_EPLB_ERROR(comm::store_barrier(*s, "lonely", 2, 50ms), errc::timeout, "1 of 2 ranks");
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("stores: set_if_absent has one winner that every racer reads") {
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("eplb-store-claim-{}", ::getpid());
  comm::tcp_store_server server("127.0.0.1", 0);
  std::vector<std::shared_ptr<comm::store>> stores{comm::make_memory_store(), comm::make_file_store(dir.string()),
                                                   comm::make_tcp_store("127.0.0.1", server.port(), 5s)};
  for (auto& s : stores) {
    for (int round = 0; round < 20; ++round) {
      const auto key = fmt::format("decision/{}", round);
      std::vector<std::string> seen(6);
      on_ranks(6, [&](int r) {
        seen[static_cast<std::size_t>(r)] = s->set_if_absent(key, fmt::format("rank {}", r));
        return 0;
      });
      // One rank's value won, every racer returned it, and a later set_if_absent cannot change it.
      CHECK(std::all_of(seen.begin(), seen.end(), [&](const auto& v) { return v == seen[0]; }));
      CHECK(seen[0].rfind("rank ", 0) == 0);
      CHECK(s->get(key, 1s) == seen[0]);
      CHECK(s->set_if_absent(key, "late") == seen[0]);
    }
    // A waiting get is answered by set_if_absent.
    std::thread setter([&] {
      std::this_thread::sleep_for(30ms);
      (void)s->set_if_absent("claimed-late", "w");
    });
    CHECK(s->get("claimed-late", 5s) == "w");
    setter.join();
    CHECK(comm::make_prefix_store(s, "p")->set_if_absent("k", "a") == "a");
    CHECK(s->get("p/k", 1s) == "a");
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("stores: erase removes a key and its counter; usage counts what is held") {
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("eplb-store-erase-{}", ::getpid());
  std::filesystem::remove_all(dir);
  comm::tcp_store_server server("127.0.0.1", 0);
  std::vector<std::shared_ptr<comm::store>> stores{comm::make_memory_store(), comm::make_file_store(dir.string()),
                                                   comm::make_tcp_store("127.0.0.1", server.port(), 5s)};
  for (auto& s : stores) {
    CHECK(s->usage().keys == 0);
    s->set("a", "12345");
    (void)s->add("n", 3);
    auto p = comm::make_prefix_store(s, "run");
    p->set("b", "x");
    const auto held = s->usage();
    CHECK(held.keys == 3);
    CHECK(held.bytes == 1 + 5 + 1 + 1 + 5 + 1);  // "a"+"12345", "n"+"3", "run/b"+"x"
    CHECK(p->usage().keys == 3);                 // a prefix store reports the whole store
    s->erase("a");
    s->erase("n");
    p->erase("b");
    s->erase("never-set");  // a no-op
    CHECK(s->usage().keys == 0);
    CHECK(s->usage().bytes == 0);
    CHECK_EPLB_ERROR(s->get("a", 20ms), errc::timeout, "\"a\"");
    CHECK(s->add("n", 1) == 1);  // the counter starts again from 0
    s->erase("n");
    // A get already waiting for an erased key is answered by a later set.
    std::thread setter([&] {
      std::this_thread::sleep_for(30ms);
      s->erase("late");
      s->set("late", "v");
    });
    CHECK(s->get("late", 5s) == "v");
    setter.join();
    s->erase("late");
    CHECK(s->usage().keys == 0);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("file store: a counter whose lock a frozen process holds is a timeout, not a hang") {
  // The fault campaign froze a rank (SIGSTOP) inside add(), holding the counter file's lock: every
  // other rank's add() then blocked for good. Here another open file description holds it.
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("eplb-store-lock-{}", ::getpid());
  std::filesystem::remove_all(dir);
  auto s = comm::make_file_store(dir.string());
  CHECK(s->add("votes", 1) == 1);
  const int holder = ::open((dir / "votes.counter").c_str(), O_RDWR);
  REQUIRE(holder >= 0);
  REQUIRE(::flock(holder, LOCK_EX) == 0);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_EPLB_ERROR(s->add("votes", 1), errc::timeout, "file store: the counter of \"votes\" stayed locked for 2000 ms");
  const auto waited = std::chrono::steady_clock::now() - t0;
  CHECK(waited >= 1900ms);
  CHECK(waited < 4s);
  ::flock(holder, LOCK_UN);
  ::close(holder);
  CHECK(s->add("votes", 1) == 2);  // the value was not touched
  std::filesystem::remove_all(dir);
}

TEST_CASE("tcp store: a get that timed out does not confuse the next request") {
  comm::tcp_store_server server("127.0.0.1", 0);
  auto s = comm::make_tcp_store("127.0.0.1", server.port(), 5s);
  CHECK_EPLB_ERROR(s->get("never", 50ms), errc::timeout, "\"never\"");
  s->set("x", "1");
  CHECK(s->get("x", 1s) == "1");
  CHECK_EPLB_ERROR(comm::make_tcp_store("127.0.0.1", 1, 100ms), errc::timeout, "cannot connect");
}

// Issue 17's long-run edge: the state's agreements poll a key in 20 ms slices for up to twice the
// timeout; each timed-out get once dropped its connection and the next slice opened another.
TEST_CASE("tcp store: gets that time out keep their connection; any value comes back whole") {
  comm::tcp_store_server server("127.0.0.1", 0);
  auto s = comm::make_tcp_store("127.0.0.1", server.port(), 5s);
  const auto settle = std::chrono::steady_clock::now() + 5s;
  while (server.connections_accepted() < 1 && std::chrono::steady_clock::now() < settle)
    std::this_thread::sleep_for(1ms);
  REQUIRE(server.connections_accepted() == 1);
  for (int i = 0; i < 100; ++i) CHECK_EPLB_ERROR(s->get("never", 2ms), errc::timeout, "\"never\" not set within 2 ms");
  for (const auto& v : std::vector<std::string>{"", "0", "0abc", "1", std::string(70000, '0')}) {
    s->set("k", v);
    CHECK(s->get("k", 1s) == v);
  }
  std::thread setter([&] {
    std::this_thread::sleep_for(50ms);
    s->set("late", "here");  // another connection: the get below holds the first
  });
  CHECK(s->get("late", 5s) == "here");
  setter.join();
  CHECK(server.connections_accepted() == 2);
}

TEST_CASE("backend report lists every backend with a reason when absent") {
  const auto report = comm::backend_report();
  REQUIRE(report.size() == 5);
  CHECK(report[4].kind == comm::backend::cuda_ipc);
  CHECK(report[0].kind == comm::backend::loopback);
  CHECK(report[0].runnable);
  for (const auto& r : report) {
    if (!r.runnable) CHECK_FALSE(r.reason.empty());
  }
  if (device::cuda_device_count() == 0) {
    CHECK_EPLB_ERROR(comm::make_communicator(comm::backend::nccl, comm::setup{}), errc::backend_unavailable, "nccl");
    CHECK_EPLB_ERROR(comm::make_communicator(comm::backend::cuda_ipc, comm::setup{}), errc::backend_unavailable,
                     "communicator cuda_ipc: ");
  }
}

namespace {

// Nice values of this process's threads, from /proc (field 19 of each task's stat).
std::multiset<int> thread_nice_values() {
  std::multiset<int> out;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream in(task.path() / "stat");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::istringstream rest(text.substr(text.rfind(')') + 2));  // fields after the command name
    std::string field;
    for (int i = 3; i <= 19 && rest >> field; ++i) {
      if (i == 19) out.insert(std::stoi(field));
    }
  }
  return out;
}

}  // namespace

TEST_CASE("gloo with a nice value runs its transport threads at that priority, not the caller") {
  const auto report = comm::backend_report();
  const bool built =
      std::any_of(report.begin(), report.end(), [](const auto& b) { return b.kind == comm::backend::gloo && b.built; });
  if (!built) return;
  const auto tid = static_cast<id_t>(::syscall(SYS_gettid));
  const int caller = ::getpriority(PRIO_PROCESS, tid);
  if (caller >= 19) return;  // already the lowest priority (a nice'd test run): nothing to observe
  const int target = std::min(19, std::max(7, caller + 3));
  const auto before = thread_nice_values();
  REQUIRE(before.count(target) == 0);
  auto c = comm::make_communicator(
      comm::backend::gloo,
      {.rank = 0, .size = 1, .rendezvous = comm::make_memory_store(), .opts = {.lanes = 2, .nice = target}});
  const auto after = thread_nice_values();
  CHECK(after.count(target) >= 2);                    // one transport thread per lane
  CHECK(::getpriority(PRIO_PROCESS, tid) == caller);  // the calling thread is untouched
}

TEST_CASE("execute_async on the owner's executor: in order, and the destructor waits for its jobs") {
  auto world = comm::make_loopback_world(2);
  const auto results = on_ranks(2, [&](int rank) {
    auto c = comm::make_communicator(comm::backend::loopback, loopback_setup(world, rank, 2));
    // The owner's executor: one thread of the test's, started per job after a pause, each job
    // waiting for the one before (in order, one at a time), so the jobs outlive the caller's calls.
    std::vector<std::thread> threads;
    std::shared_future<void> previous = std::async(std::launch::deferred, [] {}).share();
    int given = 0;
    c->set_executor([&](std::function<void()> job) {
      ++given;
      std::promise<void> ran;
      auto next = ran.get_future().share();
      threads.emplace_back([job = std::move(job), previous, ran = std::move(ran)]() mutable {
        std::this_thread::sleep_for(20ms);
        previous.wait();
        job();
        ran.set_value();
      });
      previous = next;
    });
    std::vector<std::vector<std::byte>> bufs(3, std::vector<std::byte>(64));
    std::vector<int> order;
    std::mutex order_mutex;
    for (int k = 0; k < 3; ++k) {
      std::fill(bufs[k].begin(), bufs[k].end(), std::byte{static_cast<unsigned char>(10 * k + rank + 1)});
      if (rank == 0) c->add_send(bufs[k], 1);
      if (rank == 1) c->add_recv(bufs[k], 0);
      c->execute_async([&, k](std::exception_ptr e) {
        std::lock_guard lock(order_mutex);
        order.push_back(e ? -1 : k);
      });
    }
    CHECK_EPLB_ERROR(c->set_executor({}), errc::invalid_argument, "set_executor() after execute_async()");
    c.reset();  // waits for the three jobs the executor still holds
    const bool all_ran = order == std::vector<int>{0, 1, 2};
    for (auto& t : threads) t.join();
    const bool received = rank == 0 || (bufs[0][63] == std::byte{1} && bufs[2][0] == std::byte{21});
    return given == 3 && all_ran && received;
  });
  CHECK(results[0]);
  CHECK(results[1]);
}

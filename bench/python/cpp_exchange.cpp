// The C++ side of bench/python/exchange.py, the same exchange on host or CUDA memory:
//   cpp_exchange exchange RANK SIZE STORE_DIR DEVICE EXPERT_BYTES MOVED REPS GLOO_TRANSPORT
//     one rank of the expert exchange (the pattern of bench/gpu/exchange_bench.cpp) over gloo;
//     prints one JSON line with the median seconds and GB/s.
//   cpp_exchange add_send N
//     the cost of one add_send + add_recv pair in C++ (loopback, two ranks as threads), per call.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/error.hpp"

using namespace eplb;
using clock_type = std::chrono::steady_clock;

namespace {

double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

int add_send_cost(int n) {
  auto world = comm::make_loopback_world(2);
  auto dev = device::make_host_device();
  std::vector<std::byte> a(16 * static_cast<std::size_t>(n)), b(a.size());
  double ns[2] = {0, 0};
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      comm::setup s{.rank = r, .size = 2, .world = world, .dev = dev.get()};
      auto c = comm::make_communicator(comm::backend::loopback, s);
      // Thread CPU time: the cost of the calls themselves, not of sharing a loaded host.
      const double start = thread_seconds();
      for (int i = 0; i < n; ++i) {
        if (r == 0)
          c->add_send({a.data() + 16 * i, 16}, 1);
        else
          c->add_recv({b.data() + 16 * i, 16}, 0);
      }
      ns[r] = (thread_seconds() - start) * 1e9 / n;
      c->execute();
    });
  }
  for (auto& t : ranks) t.join();
  std::cout << fmt::format(R"({{"bench":"add_send","impl":"cpp","ns_per_add_send":{:.1f},"ns_per_add_recv":{:.1f}}})"
                           "\n",
                           ns[0], ns[1]);
  return 0;
}

int exchange(char** argv) {
  const int rank = std::atoi(argv[0]), size = std::atoi(argv[1]);
  const std::string store_dir = argv[2], dev_kind = argv[3];
  const std::size_t expert_bytes = std::strtoull(argv[4], nullptr, 10);
  const int moved = std::atoi(argv[5]), reps = std::atoi(argv[6]);
  auto dev =
      dev_kind == "cuda" ? device::make_cuda_device(rank % device::cuda_device_count()) : device::make_host_device();
  auto stream = dev->create_stream();
  comm::setup s{.rank = rank,
                .size = size,
                .rendezvous = comm::make_prefix_store(comm::make_file_store(store_dir), "cpp"),
                .dev = dev.get()};
  s.opts.timeout = std::chrono::seconds(120);
  s.opts.staging_bytes = 1U << 30;
  s.opts.gloo_via = comm::parse_gloo_transport(argv[7]);
  auto c = comm::make_communicator(comm::backend::gloo, s);
  c->set_stream(stream.get());
  const auto kind = dev_kind == "cuda" ? device::memory_kind::device : device::memory_kind::host;
  auto send = dev->allocate(expert_bytes * static_cast<std::size_t>(moved), kind);
  auto recv = dev->allocate(expert_bytes * static_cast<std::size_t>(moved), kind);
  stream->fill(send.data(), std::byte{static_cast<unsigned char>(rank + 1)}, send.size());
  stream->synchronize(std::chrono::seconds(60));
  const std::size_t w13 = expert_bytes / 3 * 2;
  std::vector<double> seconds;
  for (int rep = 0; rep <= reps; ++rep) {
    comm::store_barrier(*s.rendezvous, fmt::format("rep-{}", rep), size, std::chrono::seconds(120));
    const auto start = clock_type::now();
    for (int i = 0; i < moved; ++i) {
      const int to = (rank + 1 + i % (size - 1)) % size, from = (rank - 1 - i % (size - 1) + size) % size;
      std::byte* out = send.data() + static_cast<std::size_t>(i) * expert_bytes;
      std::byte* in = recv.data() + static_cast<std::size_t>(i) * expert_bytes;
      c->add_send({out, w13}, to);
      c->add_send({out + w13, expert_bytes - w13}, to);
      c->add_recv({in, w13}, from);
      c->add_recv({in + w13, expert_bytes - w13}, from);
    }
    c->execute();
    stream->synchronize(std::chrono::seconds(120));
    if (rep > 0) seconds.push_back(std::chrono::duration<double>(clock_type::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  std::cout << fmt::format(R"({{"bench":"exchange","impl":"cpp","rank":{},"seconds":{:.6f},"gbps":{:.3f}}})"
                           "\n",
                           rank, median, static_cast<double>(expert_bytes) * moved / median / 1e9);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "add_send" && argc == 3) return add_send_cost(std::atoi(argv[2]));
    if (mode == "exchange" && argc == 10) return exchange(argv + 2);
    std::cerr << "usage: cpp_exchange add_send N | exchange RANK SIZE STORE_DIR DEVICE EXPERT_BYTES MOVED REPS "
                 "GLOO_TRANSPORT\n";
    return 2;
  } catch (const error& e) {
    std::cerr << fmt::format("error [{}] {}\n", to_string(e.code()), e.what());
    return 1;
  }
}

// One rank of a multi-process communicator test (gloo between processes, nccl on GPUs). The
// launcher (run_ranks.py) starts one per rank. Modes: conformance (random batches, every byte
// verified), registered (every pair exchanges between registered buffers, every byte verified),
// mismatch (rank 1 expects more than rank 0 sends), die (rank 1 exits after connecting; with
// --register rank 0's buffers are registered). Conformance on stateless_nccl also makes a second
// communicator over a subset of the ranks.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <array>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "comm/conformance.hpp"
#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/error.hpp"

using namespace eplb;

namespace {

// file:DIR, tcp:[HOST:]PORT or tcp-serve:[HOST:]PORT (HOST defaults to 127.0.0.1).
std::shared_ptr<comm::store> open_store(const std::string& spec, std::unique_ptr<comm::tcp_store_server>& server) {
  const auto colon = spec.find(':');
  const auto kind = spec.substr(0, colon);
  const auto rest = colon == std::string::npos ? std::string() : spec.substr(colon + 1);
  if (kind == "file") return comm::make_file_store(rest);
  const auto last = rest.rfind(':');
  const auto host = last == std::string::npos ? std::string("127.0.0.1") : rest.substr(0, last);
  const auto port = static_cast<std::uint16_t>(std::stoi(last == std::string::npos ? rest : rest.substr(last + 1)));
  if (kind == "tcp-serve") {
    server = std::make_unique<comm::tcp_store_server>(host, port);
    return comm::make_tcp_store(host, server->port(), std::chrono::seconds(30));
  }
  if (kind == "tcp") return comm::make_tcp_store(host, port, std::chrono::seconds(30));
  throw error(errc::invalid_argument,
              "--store: expected file:DIR, tcp:[HOST:]PORT or tcp-serve:[HOST:]PORT, got " + spec);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eplb communicator test rank"};
  std::string backend_name = "gloo", store_spec, device_name = "host", mode = "conformance", expect,
              hostname = "127.0.0.1";
  int rank = 0, size = 2, rounds = 3, lanes = 2, timeout_ms = 30000;
  std::uint64_t seed = 1;
  std::size_t chunk = 4096, staging = 1 << 20;
  bool staged = false, pull = false;
  app.add_option("--backend", backend_name);
  app.add_option("--rank", rank)->required();
  app.add_option("--size", size)->required();
  app.add_option("--store", store_spec)->required();
  app.add_option("--device", device_name);
  app.add_option("--mode", mode);
  app.add_option("--expect", expect, "the error text this rank must report (error modes)");
  app.add_option("--rounds", rounds);
  app.add_option("--seed", seed);
  app.add_option("--chunk", chunk);
  app.add_option("--lanes", lanes);
  std::string gloo_via = "auto";
  app.add_option("--gloo-transport", gloo_via, "gloo: auto | tcp | shared_memory");
  app.add_option("--staging-bytes", staging);
  app.add_option("--timeout-ms", timeout_ms);
  app.add_flag("--staged", staged, "buffers in device memory, staged through the stream");
  app.add_flag("--pull", pull, "cuda_ipc: receivers read from the sender's mailbox");
  bool registered = false;
  app.add_flag("--register", registered, "die: the buffers are the communicator's registered memory");
  double max_gbps = 0;
  app.add_option("--ipc-max-gbps", max_gbps, "cuda_ipc: cap on each rank's copy rate");
  app.add_option("--hostname", hostname, "gloo: the address this rank listens on");
  CLI11_PARSE(app, argc, argv);

  try {
    const auto kind = device::parse_backend_kind(device_name);
    const int gpus = device::cuda_device_count();
    // EPLB_SHARE_GPUS=1: ranks share the GPUs there are (correctness runs on a one-GPU machine).
    const bool share = std::getenv("EPLB_SHARE_GPUS") != nullptr && gpus > 0;
    if (kind == device::backend_kind::cuda && gpus < size && !share) {
      std::cout << fmt::format("rank {}: skip: {} ranks need {} GPUs, found {}\n", rank, size, size, gpus);
      return 77;
    }
    auto dev = device::make_device(kind, kind == device::backend_kind::cuda ? rank % std::max(gpus, 1) : 0);
    auto stream = dev->create_stream();
    std::unique_ptr<comm::tcp_store_server> server;
    auto store = open_store(store_spec, server);
    comm::setup s;
    s.rank = rank;
    s.size = size;
    s.rendezvous = comm::make_prefix_store(store, "comm");
    s.dev = dev.get();
    s.opts.timeout = std::chrono::milliseconds(timeout_ms);
    s.opts.chunk_bytes = chunk;
    s.opts.lanes = lanes;
    s.opts.staging_bytes = staging;
    s.opts.hostname = hostname;
    s.opts.cuda_ipc_pull = pull;
    s.opts.cuda_ipc_max_gbps = max_gbps;
    s.opts.gloo_via = comm::parse_gloo_transport(gloo_via);
    const auto backend = comm::parse_backend(backend_name);
    auto c = comm::make_communicator(backend, s);
    const bool use_stream = staged || kind == device::backend_kind::cuda;

    if (mode == "conformance") {
      const auto result = testing::run_conformance(*c, *dev, use_stream ? stream.get() : nullptr,
                                                   {.seed = seed, .rounds = rounds, .chunk_bytes = chunk});
      if (!result.empty()) {
        std::cout << "FAIL " << result << '\n';
        return 1;
      }
      if (backend == comm::backend::stateless_nccl && size > 2) {
        // Elastic EP: ranks 0..size-2 build a new communicator without the last rank, and use it.
        c.reset();
        if (rank < size - 1) {
          comm::setup smaller = s;
          smaller.size = size - 1;
          smaller.rendezvous = comm::make_prefix_store(store, "comm-shrunk");
          auto c2 = comm::make_communicator(backend, smaller);
          const auto r2 =
              testing::run_conformance(*c2, *dev, stream.get(), {.seed = seed + 9, .rounds = 2, .chunk_bytes = chunk});
          if (!r2.empty()) {
            std::cout << "FAIL after re-creation: " << r2 << '\n';
            return 1;
          }
        }
      }
      std::cout << fmt::format("rank {}: {} conformance ok ({} rounds)\n", rank, backend_name, rounds);
      return 0;
    }

    // Registered memory of the communicator, or ordinary memory registered with it (an empty
    // registration where the backend has none).
    const auto registered_block = [&](std::size_t bytes) {
      auto m = c->allocate_registered(bytes);
      if (m.memory.size() == 0) {
        m.memory = dev->allocate(bytes, use_stream ? device::memory_kind::device : device::memory_kind::host);
        m.reg = c->register_memory(m.memory.span());
      }
      return m;
    };
    if (mode == "registered") {
      // Rounds of different sizes at odd offsets between every pair; both ends in registered memory.
      c->set_stream(use_stream ? stream.get() : nullptr);
      const std::size_t region = 4U << 20;
      const auto at = [&](int q, int round) { return static_cast<std::size_t>(q) * region + 7U * round; };
      auto out = registered_block(region * static_cast<std::size_t>(size));
      auto in = registered_block(region * static_cast<std::size_t>(size));
      const auto pattern = [](int from, int to, int round, std::size_t i) {
        return static_cast<std::byte>((from * 31 + to * 17 + round * 13 + static_cast<int>(i % 251)) & 0xff);
      };
      for (int round = 0; round < 4; ++round) {
        const std::size_t bytes = std::array<std::size_t, 4>{1, 4097, 1U << 20, (4U << 20) - 64}[round];
        std::vector<std::byte> host(bytes);
        for (int q = 0; q < size; ++q) {
          if (q == rank) continue;
          for (std::size_t i = 0; i < bytes; ++i) host[i] = pattern(rank, q, round, i);
          stream->copy(out.memory.data() + at(q, round), host.data(), bytes);
          stream->synchronize(std::chrono::seconds(30));
          c->add_send(std::span<const std::byte>(out.memory.data() + at(q, round), bytes), q);
          c->add_recv(std::span<std::byte>(in.memory.data() + at(q, round), bytes), q);
        }
        c->execute();
        stream->synchronize(std::chrono::seconds(30));
        for (int q = 0; q < size; ++q) {
          if (q == rank) continue;
          stream->copy(host.data(), in.memory.data() + at(q, round), bytes);
          stream->synchronize(std::chrono::seconds(30));
          for (std::size_t i = 0; i < bytes; ++i) {
            if (host[i] != pattern(q, rank, round, i)) {
              std::cout << fmt::format("rank {}: FAIL round {} ({} bytes) from rank {}: byte {} differs\n", rank, round,
                                       bytes, q, i);
              return 1;
            }
          }
        }
      }
      const bool nccl = backend == comm::backend::nccl || backend == comm::backend::stateless_nccl;
      if (nccl && (!out.reg.active() || !in.reg.active())) {
        std::cout << fmt::format("rank {}: FAIL: {} gave no registration\n", rank, backend_name);
        return 1;
      }
      std::cout << fmt::format("rank {}: {} registered exchange ok (registration {})\n", rank, backend_name,
                               out.reg.active() ? "active" : "none");
      return 0;
    }

    auto reg_block = registered ? registered_block(64) : comm::registered_memory{};
    std::vector<std::byte> small(8), large(16);
    auto dev_small = dev->allocate(8, use_stream ? device::memory_kind::device : device::memory_kind::host);
    auto dev_large = dev->allocate(16, use_stream ? device::memory_kind::device : device::memory_kind::host);
    c->set_stream(use_stream ? stream.get() : nullptr);
    std::jthread aborter;  // mode abort; joined before `c` goes
    if (mode == "mismatch") {
      if (rank == 0) c->add_send(std::span<const std::byte>(dev_small.data(), 8), 1);
      if (rank == 1) c->add_recv(std::span<std::byte>(dev_large.data(), 16), 0);
    } else if (mode == "die") {
      if (rank == 1) std::_Exit(0);  // connected, then gone without a word
      std::byte* buf = registered ? reg_block.memory.data() : dev_small.data();
      c->add_send(std::span<const std::byte>(buf, 8), 1);
      c->add_recv(std::span<std::byte>(buf + 8, 8), 1);
    } else if (mode == "abort") {
      // Issue 17: rank 0 waits for rank 1, which starts its batch only after 1 s; meanwhile rank 0
      // aborts its communicator from another thread. Rank 0 must end cancelled at once; rank 1,
      // whose batch matches, must hear of the abort (rank 0's process lives on for 3 s, so it is
      // the closed connections that tell it), both long before the timeout.
      c->add_send(std::span<const std::byte>(dev_small.data(), 8), 1 - rank);
      c->add_recv(std::span<std::byte>(dev_large.data(), 8), 1 - rank);
      expect = rank == 0 ? "aborted (rank 0 is stopping)" : "rank 0 failed (peer died or closed the connection)";
      if (rank == 0) {
        aborter = std::jthread([&c] {
          std::this_thread::sleep_for(std::chrono::milliseconds(300));
          c->abort("rank 0 is stopping");
        });
      } else {
        std::this_thread::sleep_for(std::chrono::seconds(1));
      }
    } else {
      throw error(errc::invalid_argument, "--mode: unknown mode " + mode);
    }
    c->execute();
    std::cout << fmt::format("rank {}: FAIL: mode {} finished without an error\n", rank, mode);
    return 1;
  } catch (const error& e) {
    std::cout << fmt::format("rank {}: error [{}] {}\n", rank, to_string(e.code()), e.what());
    if (mode == "abort" && rank == 0) std::this_thread::sleep_for(std::chrono::seconds(3));
    if (!expect.empty() && std::string(e.what()).find(expect) != std::string::npos) return 0;
    return 1;
  } catch (const std::exception& e) {
    std::cout << fmt::format("rank {}: unexpected exception {}\n", rank, e.what());
    return 1;
  }
}

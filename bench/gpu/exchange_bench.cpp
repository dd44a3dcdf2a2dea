// One rank of the expert-exchange benchmark (run one process per GPU through run_ranks.py): each
// rank sends `moved` experts (two tensors each, like w13 and w2) spread over the other ranks and
// receives as many, on one communicator backend; prints one JSON line per rank with the median time.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <iostream>

#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/error.hpp"

using namespace eplb;
using clock_type = std::chrono::steady_clock;

int main(int argc, char** argv) {
  CLI::App app{"eplb exchange benchmark rank"};
  std::string backend_name = "nccl", store_spec, label;
  int rank = 0, size = 2, moved = 16, reps = 10, lanes = comm::options{}.lanes;
  std::size_t expert_bytes = 9'437'184, chunk = comm::options{}.chunk_bytes, staging = 1U << 30;
  app.add_option("--backend", backend_name);
  app.add_option("--rank", rank)->required();
  app.add_option("--size", size)->required();
  app.add_option("--store", store_spec)->required();
  app.add_option("--label", label);
  app.add_option("--expert-bytes", expert_bytes);
  app.add_option("--moved", moved, "experts each rank sends (and receives)");
  app.add_option("--reps", reps);
  app.add_option("--chunk", chunk);
  app.add_option("--lanes", lanes);
  std::string gloo_via = "auto";
  app.add_option("--gloo-transport", gloo_via, "gloo: auto | tcp | shared_memory");
  app.add_option("--staging-bytes", staging);
  bool pull = false;
  app.add_flag("--pull", pull, "cuda_ipc: receivers read from the sender's mailbox");
  CLI11_PARSE(app, argc, argv);
  try {
    const int gpus = device::cuda_device_count();
    // EPLB_SHARE_GPUS=1: ranks share the GPUs there are (a proxy where fewer GPUs than ranks are lent).
    const bool share = std::getenv("EPLB_SHARE_GPUS") != nullptr && gpus > 0;
    if (gpus < size && !share) {
      std::cout << fmt::format("skip: {} ranks need {} GPUs, found {}\n", size, size, gpus);
      return 77;
    }
    auto dev = device::make_cuda_device(rank % gpus);
    auto stream = dev->create_stream();
    const auto colon = store_spec.find(':');
    auto store = comm::make_file_store(store_spec.substr(colon + 1));
    comm::setup s;
    s.rank = rank;
    s.size = size;
    s.rendezvous = comm::make_prefix_store(store, "bench-" + backend_name + label);
    s.dev = dev.get();
    s.opts.timeout = std::chrono::seconds(120);
    s.opts.chunk_bytes = chunk;
    s.opts.lanes = lanes;
    s.opts.gloo_via = comm::parse_gloo_transport(gloo_via);
    s.opts.staging_bytes = staging;
    s.opts.cuda_ipc_pull = pull;
    auto c = comm::make_communicator(comm::parse_backend(backend_name), s);
    c->set_stream(stream.get());
    const std::size_t w13 = expert_bytes / 3 * 2;
    const std::size_t w2 = expert_bytes - w13;
    auto send = dev->allocate(expert_bytes * static_cast<std::size_t>(moved), device::memory_kind::device);
    auto recv = dev->allocate(expert_bytes * static_cast<std::size_t>(moved), device::memory_kind::device);
    stream->fill(send.data(), std::byte{static_cast<unsigned char>(rank + 1)}, send.size());
    stream->synchronize(std::chrono::seconds(60));
    std::vector<double> seconds;
    for (int rep = 0; rep <= reps; ++rep) {
      comm::store_barrier(*s.rendezvous, fmt::format("rep-{}", rep), size, std::chrono::seconds(120));
      // The store barrier releases ranks up to a few ms apart (file polling); a one-byte exchange
      // with every peer on the communicator itself lines them up before the clock starts.
      for (int p = 0; p < size; ++p) {
        if (p == rank) continue;
        c->add_send({send.data(), 1}, p);
        c->add_recv({recv.data() + p, 1}, p);
      }
      c->execute();
      stream->synchronize(std::chrono::seconds(120));
      const auto start = clock_type::now();
      // Expert i goes to peer (rank + 1 + i % (size - 1)) % size; receives mirror that rule.
      for (int i = 0; i < moved; ++i) {
        const int to = (rank + 1 + i % (size - 1)) % size;
        const int from = (rank - 1 - i % (size - 1) + size) % size;
        std::byte* out = send.data() + static_cast<std::size_t>(i) * expert_bytes;
        std::byte* in = recv.data() + static_cast<std::size_t>(i) * expert_bytes;
        c->add_send({out, w13}, to);
        c->add_send({out + w13, w2}, to);
        c->add_recv({in, w13}, from);
        c->add_recv({in + w13, w2}, from);
      }
      c->execute();
      stream->synchronize(std::chrono::seconds(120));
      if (rep > 0) seconds.push_back(std::chrono::duration<double>(clock_type::now() - start).count());
    }
    // Check one byte per received expert: it must be the sender's fill value.
    std::vector<std::byte> probe(static_cast<std::size_t>(moved));
    for (int i = 0; i < moved; ++i)
      stream->copy(&probe[static_cast<std::size_t>(i)],
                   recv.data() + static_cast<std::size_t>(i) * expert_bytes + expert_bytes - 1, 1);
    stream->synchronize(std::chrono::seconds(60));
    bool ok = true;
    for (int i = 0; i < moved; ++i) {
      const int from = (rank - 1 - i % (size - 1) + size) % size;
      ok = ok && probe[static_cast<std::size_t>(i)] == std::byte{static_cast<unsigned char>(from + 1)};
    }
    std::sort(seconds.begin(), seconds.end());
    const double median = seconds[seconds.size() / 2];
    const double bytes = static_cast<double>(expert_bytes) * moved;
    std::cout << fmt::format(
        R"({{"bench":"exchange","impl":"eplb","backend":"{}","label":"{}","ranks":{},"rank":{},"expert_bytes":{},"moved":{},"seconds":{:.6f},"gbps":{:.2f},"verified":{}}})"
        "\n",
        backend_name + (pull ? "-pull" : "") + (backend_name == "gloo" && !c->caps().crosses_nodes ? "-shm" : ""),
        label, size, rank, expert_bytes, moved, median, bytes / median / 1e9, ok);
    return ok ? 0 : 1;
  } catch (const error& e) {
    std::cout << fmt::format("rank {}: error [{}] {}\n", rank, to_string(e.code()), e.what());
    return 1;
  }
}

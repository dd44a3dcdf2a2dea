// One rank of the whole-model rearrangement benchmark (one process per GPU via run_ranks.py): a model
// of --layers layers of --experts experts (+ --redundant) with bundles of two tensors (w13, w2 in a
// 2:1 split of --expert-bytes) moves from vLLM's initial placement to the default policy's placement
// for a skewed load, layer by layer with the nccl communicator. Rank 0 writes both maps (JSON) for
// the PyTorch peer. Prints one JSON line per rank.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cmath>
#include <fstream>
#include <iostream>
#include <random>

#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/core/policy.hpp"
#include "eplb/error.hpp"
#include "eplb/exec/rearrange.hpp"

using namespace eplb;

int main(int argc, char** argv) {
  CLI::App app{"eplb rearrangement benchmark rank"};
  std::string store_spec, label = "model", maps_out, backend_name = "nccl";
  int rank = 0, size = 2, layers = 48, experts = 128, redundant = 0, reps = 3;
  std::size_t expert_bytes = 9'437'184;
  app.add_option("--rank", rank)->required();
  app.add_option("--size", size)->required();
  app.add_option("--store", store_spec)->required();
  app.add_option("--label", label);
  app.add_option("--backend", backend_name);
  app.add_option("--layers", layers);
  app.add_option("--experts", experts);
  app.add_option("--redundant", redundant);
  app.add_option("--expert-bytes", expert_bytes);
  app.add_option("--reps", reps);
  app.add_option("--maps-out", maps_out);
  bool coalesce = true;
  app.add_flag("!--no-coalesce", coalesce, "one message per tensor of every expert");
  bool pipeline = true;
  app.add_flag("!--no-pipeline", pipeline, "one layer at a time, waiting for its copies");
  bool register_buffers = false;
  app.add_flag("--register", register_buffers, "register staging and packing buffers with the communicator");
  CLI11_PARSE(app, argc, argv);
  try {
    if (device::cuda_device_count() < size) return 77;
    auto dev = device::make_cuda_device(rank);
    auto stream = dev->create_stream();
    auto store = comm::make_file_store(store_spec.substr(store_spec.find(':') + 1));
    comm::setup s{.rank = rank,
                  .size = size,
                  .rendezvous = comm::make_prefix_store(store, "rearrange-" + label),
                  .dev = dev.get()};
    s.opts.timeout = std::chrono::seconds(300);
    auto c = comm::make_communicator(comm::parse_backend(backend_name), s);
    const int slots = experts + redundant;
    exec::model_shape shape{.layers = layers, .num_logical = experts, .num_physical = slots, .num_ranks = size};
    const std::size_t w13 = expert_bytes / 3 * 2, w2 = expert_bytes - w13;
    shape.bundle = {{"w13", w13, w13, device::memory_kind::device}, {"w2", w2, w2, device::memory_kind::device}};
    std::vector<device::buffer> storage;
    exec::rank_weights weights;
    weights.base.resize(static_cast<std::size_t>(layers));
    for (int l = 0; l < layers; ++l) {
      for (const auto& t : shape.bundle) {
        storage.push_back(
            dev->allocate(t.stride * static_cast<std::size_t>(shape.slots_per_rank()), device::memory_kind::device));
        stream->fill(storage.back().data(), std::byte{static_cast<unsigned char>(l + 1)}, storage.back().size());
        weights.base[static_cast<std::size_t>(l)].push_back(storage.back().data());
      }
    }
    stream->synchronize(std::chrono::seconds(120));
    const auto start = placement::initial(layers, experts, slots, size).phy2log();
    std::mt19937_64 rng(5);
    matrix<double> load(static_cast<std::size_t>(layers), static_cast<std::size_t>(experts));
    for (auto& v : load.flat()) v = std::floor(std::exp(std::normal_distribution<double>(6, 1.2)(rng)));
    const auto target = rebalance_default({load, slots, 1, 1, size, &start});
    if (rank == 0 && !maps_out.empty()) {
      std::ofstream out(maps_out);
      out << "{\"old\": [";
      for (int l = 0; l < layers; ++l)
        out << (l ? "," : "") << fmt::format("[{}]", fmt::join(start.row(static_cast<std::size_t>(l)), ","));
      out << "], \"new\": [";
      for (int l = 0; l < layers; ++l)
        out << (l ? "," : "") << fmt::format("[{}]", fmt::join(target.row(static_cast<std::size_t>(l)), ","));
      out << "]}";
    }
    exec::rearranger r(shape, rank, *dev, *stream, *c,
                       {.timeout = std::chrono::seconds(300),
                        .coalesce = coalesce,
                        .pipeline = pipeline,
                        .register_buffers = register_buffers});
    std::vector<double> seconds;
    std::uint64_t bytes = 0;
    for (int rep = 0; rep <= reps; ++rep) {
      placement maps(rep % 2 == 0 ? start : target, experts, size);
      const auto& to = rep % 2 == 0 ? target : start;  // alternate directions: every rep moves the same amount
      comm::store_barrier(*s.rendezvous, fmt::format("rep-{}", rep), size, std::chrono::seconds(300));
      const auto t0 = std::chrono::steady_clock::now();
      std::uint64_t rep_bytes = 0;
      for (const auto& st : r.rearrange(weights, maps, to)) rep_bytes += st.bytes_received;
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (rep > 0) seconds.push_back(sec), bytes = rep_bytes;
    }
    std::sort(seconds.begin(), seconds.end());
    const double med = seconds[seconds.size() / 2];
    std::cout << fmt::format(
        R"({{"bench":"rearrange","impl":"{}","backend":"{}","label":"{}","ranks":{},"rank":{},"layers":{},"bytes_received":{},"seconds":{:.4f},"ms_per_layer":{:.3f},"gbps":{:.2f}}})"
        "\n",
        std::string(pipeline ? (coalesce ? "eplb" : "eplb-per-tensor")
                             : (coalesce ? "eplb-serial" : "eplb-serial-per-tensor")) +
            (register_buffers ? "-registered" : ""),
        backend_name, label, size, rank, layers, bytes, med, med * 1000 / layers,
        static_cast<double>(bytes) / med / 1e9);
    return 0;
  } catch (const error& e) {
    std::cout << fmt::format("rank {}: error [{}] {}\n", rank, to_string(e.code()), e.what());
    return 1;
  }
}

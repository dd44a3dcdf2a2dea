// The loopback ranks the EplbState tests run (threads of one process): one rank's host device,
// serving stream and recognisable weights for the 12-expert test model, its state_params, and the
// byte check of its slots against the maps.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "eplb/state.hpp"
#include "tools/exchange.hpp"

namespace eplb::testing::loopback_ranks {

using namespace std::chrono_literals;

struct rank_setup {
  std::unique_ptr<device::device> dev;
  std::unique_ptr<device::stream> stream;
  std::unique_ptr<tools::pattern_model> model;
  std::unique_ptr<eplb_state> state;
};

// Layers x slots of skewed counts: a few hot experts, which move with `phase`.
inline std::vector<std::int64_t> skewed_counts(int slots, int step, int phase, int rank) {
  std::vector<std::int64_t> c(static_cast<std::size_t>(slots));
  for (int s = 0; s < slots; ++s) c[s] = ((s + phase) % slots < 2 ? 50 : 1) + (step + rank + s) % 3;
  return c;
}

// The device, serving stream and live weights of one rank; no state yet. The model has 12 experts
// on `slots` slots over the ranks; `empty`: a joining rank's slots, which hold no expert's bytes.
inline rank_setup make_model(int rank, int ranks, device::host_faults faults = {}, int slots = 16, bool empty = false) {
  rank_setup r;
  r.dev = device::make_host_device(faults);
  r.stream = r.dev->create_stream();
  tools::exchange_config shape_cfg{
      .ranks = ranks, .layers = 4, .experts = 12, .redundant = slots - 12, .tensor_bytes = {256, 48}};
  const auto start =
      empty ? matrix<expert_id>(4, static_cast<std::size_t>(slots), -1) : tools::round_placement(shape_cfg, 0, {});
  r.model =
      std::make_unique<tools::pattern_model>(tools::pattern_shape(shape_cfg), rank, *r.dev, *r.stream, start, 10s);
  return r;
}

inline state_params params_for(const rank_setup& r, int rank, const config& cfg,
                               const std::shared_ptr<comm::loopback_world>& world,
                               const std::shared_ptr<comm::store>& store) {
  state_params p;
  p.cfg = cfg;
  p.model = {r.model->shape(), 2, 1};
  p.rank = rank;
  p.dev = r.dev.get();
  p.serving_stream = r.stream.get();
  p.weights = r.model->weights();
  p.store = store;
  p.comm_setup.world = world;
  p.log = [](std::string_view) {};
  return p;
}

inline rank_setup make_rank(int rank, int ranks, const config& cfg, const std::shared_ptr<comm::loopback_world>& world,
                            const std::shared_ptr<comm::store>& store, device::host_faults faults = {}) {
  auto r = make_model(rank, ranks, faults);
  r.state = std::make_unique<eplb_state>(params_for(r, rank, cfg, world, store));
  return r;
}

// Checks every local slot of `layer` against the reference bytes of the expert the maps put there.
inline std::string verify(rank_setup& r, int layer, int rank) {
  return r.model->mismatch(layer, r.state->maps().phy2log(layer), rank);
}

// A loopback config for the 12-expert, 16-slot test model.
inline config loopback_config(bool use_async, int window, int interval, std::chrono::milliseconds timeout) {
  config cfg;
  cfg.use_async = use_async;
  cfg.communicator = "loopback";
  cfg.num_redundant_experts = 4;
  cfg.window_size = window;
  cfg.step_interval = interval;
  cfg.timeout = timeout;
  return cfg;
}

}  // namespace eplb::testing::loopback_ranks

// Sync mode under transfer faults (issue 15): a randomized campaign on 4 loopback ranks (threads).
// One rank's batch fails at a random point of a random rebalance, on the pipelined, the one-chunk
// and the chunked paths. Every rank must fail that rebalance in the same step, end it with the
// same maps as every other rank, hold its mapped expert's bytes in every live slot, and rebalance
// successfully afterwards on communicators every rank made again.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <barrier>
#include <random>

#include "check_error.hpp"
#include "eplb/state.hpp"
#include "on_ranks.hpp"
#include "tools/exchange.hpp"
#include "tools/faulty_comm.hpp"

using namespace eplb;
using eplb::testing::on_ranks;
using namespace std::chrono_literals;

namespace {

constexpr int ranks = 4;
constexpr int layers = 4;
constexpr int slots = 16;

struct trial {
  std::uint64_t seed;
  std::size_t staging_bytes;  // 0: pipelined; one layer: serial; less: chunked
  int fault_rank;
  int fault_batch;  // the n-th batch of the fault rank's communicator from the armed step
  int arm_step;
};

struct rank_outcome {
  std::vector<int> failed_steps;
  std::vector<std::string> errors;
  matrix<expert_id> maps;
  std::string bad_bytes;  // the first slot whose bytes are not its mapped expert's
  int finished_after_fault = 0;
  int comms_made = 0;
};

std::vector<std::int64_t> drifting_counts(int step, int layer, int rank) {
  std::vector<std::int64_t> c(slots);
  const int phase = (step / 25 + layer) % slots;
  for (int s = 0; s < slots; ++s)
    c[static_cast<std::size_t>(s)] = ((s + phase) % slots < 3 ? 80 : 1) + (step + rank + s) % 5;
  return c;
}

std::string check_bytes(tools::pattern_model& model, const placement& maps, int rank) {
  for (int l = 0; l < layers; ++l) {
    if (auto bad = model.mismatch(l, maps.phy2log(l), rank); !bad.empty()) return bad;
  }
  return {};
}

// `step_barrier` stands for the engine's per-step all-to-all, which keeps ranks within a step of
// each other (a rank that fails fast does not run ahead into the next rebalance alone).
rank_outcome run_rank(const trial& t, int rank, const std::shared_ptr<comm::loopback_world>& world,
                      const std::shared_ptr<comm::store>& store, std::barrier<>& step_barrier) {
  auto dev = device::make_host_device();
  auto stream = dev->create_stream();
  tools::exchange_config shape_cfg{
      .ranks = ranks, .layers = layers, .experts = 12, .redundant = 4, .tensor_bytes = {256, 48}};
  tools::pattern_model model(tools::pattern_shape(shape_cfg), rank, *dev, *stream,
                             tools::round_placement(shape_cfg, 0, {}), 10s);
  auto sw = std::make_shared<tools::fault_switch>();
  state_params p;
  p.cfg.communicator = "loopback";
  p.cfg.num_redundant_experts = 4;
  p.cfg.window_size = 20;
  p.cfg.step_interval = 40;
  p.cfg.timeout = 2s;
  p.cfg.staging_bytes = t.staging_bytes;
  p.model = {model.shape(), 2, 1};
  p.rank = rank;
  p.dev = dev.get();
  p.serving_stream = stream.get();
  p.weights = model.weights();
  p.store = store;
  p.comm_setup.world = world;
  p.log = [](std::string_view) {};
  p.comm_wrap = [sw](std::unique_ptr<comm::communicator> inner, int) -> std::unique_ptr<comm::communicator> {
    ++sw->made;
    return std::make_unique<tools::faulty_communicator>(std::move(inner), sw);
  };
  eplb_state state(std::move(p));
  rank_outcome out;
  for (int step = 0; step < 200; ++step) {
    step_barrier.arrive_and_wait();
    if (rank == t.fault_rank && step == t.arm_step) sw->countdown = t.fault_batch;
    for (int l = 0; l < layers; ++l) state.record_load(l, drifting_counts(step, l, rank));
    try {
      const auto rep = state.step();
      if (rep.rebalance_finished && !out.failed_steps.empty()) ++out.finished_after_fault;
    } catch (const error& e) {
      out.failed_steps.push_back(step);
      out.errors.emplace_back(e.what());
    }
  }
  out.maps = state.maps().phy2log();
  out.bad_bytes = check_bytes(model, state.maps(), rank);
  out.comms_made = sw->made;
  return out;
}

}  // namespace

namespace {

struct campaign_totals {
  int faults_seen = 0;
  int partial_layers = 0;
  int lost_in_staging = 0;
};

// `trials` runs over `caps`, each with one fault at a random batch of a random rank.
campaign_totals run_campaign(std::span<const std::size_t> caps, int trials, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  campaign_totals totals;
  for (int i = 0; i < trials; ++i) {
    const trial t{.seed = rng(),
                  .staging_bytes = caps[static_cast<std::size_t>(i) % caps.size()],
                  .fault_rank = static_cast<int>(rng() % ranks),
                  .fault_batch = 1 + static_cast<int>(rng() % 6),
                  .arm_step = 45 + static_cast<int>(rng() % 30)};
    CAPTURE(i);
    CAPTURE(t.staging_bytes);
    CAPTURE(t.fault_rank);
    CAPTURE(t.fault_batch);
    CAPTURE(t.arm_step);
    auto world = comm::make_loopback_world(ranks);
    auto store = comm::make_memory_store();
    std::barrier<> step_barrier(ranks);
    const auto outs = on_ranks(ranks, [&](int rank) { return run_rank(t, rank, world, store, step_barrier); });
    const bool lost = !outs[0].errors.empty() && outs[0].errors[0].find("were only in staging") != std::string::npos;
    totals.lost_in_staging += lost ? 1 : 0;
    for (int r = 0; r < ranks; ++r) {
      const auto& o = outs[static_cast<std::size_t>(r)];
      CAPTURE(r);
      for (std::size_t k = 0; k < o.errors.size(); ++k) CAPTURE(o.errors[k]);
      CHECK_MESSAGE(o.bad_bytes.empty(), o.bad_bytes);  // every live slot, whatever the stop
      CHECK(o.failed_steps == outs[0].failed_steps);  // the failure ends the rebalance everywhere in one step
      CHECK(o.maps == outs[0].maps);
      CHECK(o.comms_made == outs[0].comms_made);                        // re-made on every rank alike
      if (!o.failed_steps.empty()) CHECK(o.finished_after_fault >= 1);  // and later rebalances succeed
    }
    if (outs[0].failed_steps.empty()) continue;
    ++totals.faults_seen;
    CHECK(outs[static_cast<std::size_t>(t.fault_rank)].errors[0].find("injected transfer fault") != std::string::npos);
    for (const auto& o : outs) {
      if (o.errors[0].find("stopped on every rank after") != std::string::npos) ++totals.partial_layers;
    }
  }
  return totals;
}

}  // namespace

TEST_CASE("sync transfer faults, whole layers: every rank stops at the same batch, maps identical and truthful") {
  const std::size_t layer_bytes = static_cast<std::size_t>(slots / ranks) * (256 + 48);
  const std::size_t caps[] = {0, layer_bytes};  // pipelined; serial, one batch per layer
  const auto totals = run_campaign(caps, 24, 20261202);
  CHECK(totals.lost_in_staging == 0);
  CHECK(totals.faults_seen >= 16);
  MESSAGE(fmt::format("{} of 24 trials hit their fault", totals.faults_seen));
}

TEST_CASE("sync transfer faults, chunked layers: every rank stops after the same chunk with identical maps") {
  const std::size_t caps[] = {2 * (256 + 48), 3 * (256 + 48)};
  const auto totals = run_campaign(caps, 24, 7);
  CHECK(totals.faults_seen >= 16);
  CHECK(totals.partial_layers > 0);  // the partly moved layers' maps were checked byte for byte
  // A staging row that held an expert's only copy when the vote stopped the layer is written back
  // into a slot (exec::stop_after_chunks), so no expert is lost and the maps stay true.
  CHECK(totals.lost_in_staging == 0);
  MESSAGE(
      fmt::format("{} of 24 trials hit their fault, {} rank-failures left a layer partly moved (maps follow), {} "
                  "lost an expert that was only in staging",
                  totals.faults_seen, totals.partial_layers, totals.lost_in_staging));
}

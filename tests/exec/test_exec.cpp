// The transfer plan, the in-place rearrangement on loopback ranks (threads), staging caps,
// elastic scale-up/down and fault injection. Every byte is verified.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <future>
#include <map>
#include <random>

#include "check_error.hpp"
#include "comm/transport.hpp"
#include "device/event_state.hpp"
#include "eplb/core/policy.hpp"
#include "eplb/exec/plan.hpp"
#include "eplb/exec/rearrange.hpp"
#include "on_ranks.hpp"
#include "tools/exchange.hpp"

using namespace eplb;
using eplb::testing::on_ranks;
using namespace std::chrono_literals;

namespace {

std::vector<expert_id> random_row(std::mt19937_64& rng, int experts, int slots, bool empties) {
  std::vector<expert_id> row(static_cast<std::size_t>(slots));
  for (int e = 0; e < experts; ++e) row[e] = e;
  for (int p = experts; p < slots; ++p) {
    row[p] = empties && rng() % 3 == 0 ? empty_slot : static_cast<expert_id>(rng() % static_cast<unsigned>(experts));
  }
  std::shuffle(row.begin(), row.end(), rng);
  return row;
}

}  // namespace

TEST_CASE("plan: every send has exactly one matching receive, in the same order per pair") {
  std::mt19937_64 rng(42);
  for (int iter = 0; iter < 300; ++iter) {
    const int ranks = 2 + static_cast<int>(rng() % 7);
    const int experts = 1 + static_cast<int>(rng() % 20);
    const int per_rank = (experts + ranks - 1) / ranks + static_cast<int>(rng() % 3);
    const int slots = per_rank * ranks;
    const auto old_row = random_row(rng, experts, slots, true);
    const auto new_row = random_row(rng, experts, slots, true);
    // (sender, receiver) -> ordered experts, seen from both ends.
    std::map<std::pair<int, int>, std::vector<expert_id>> sent, received;
    for (int r = 0; r < ranks; ++r) {
      const auto p = exec::plan_layer(old_row, new_row, ranks, r);
      for (const auto& s : p.sends) {
        CHECK(s.peer != r);
        CHECK(p.old_local[static_cast<std::size_t>(s.slot)] == s.expert);  // sends read the expert itself
        sent[{r, s.peer}].push_back(s.expert);
      }
      for (const auto& v : p.recvs) {
        CHECK(p.primary[static_cast<std::size_t>(v.slot)]);
        CHECK(p.new_local[static_cast<std::size_t>(v.slot)] == v.expert);
        received[{v.peer, r}].push_back(v.expert);
      }
      // Every changed, non-empty slot gets its expert one way or another.
      for (int s = 0; s < p.slots; ++s) {
        if (p.unchanged[s] || p.new_local[s] < 0) continue;
        CHECK((p.from_local[s] + p.primary[s] + (p.primary_of[s] >= 0)) == 1);
      }
    }
    CHECK(sent == received);
  }
}

TEST_CASE("plan: vLLM's sender rule splits receivers in blocks, remainder round robin") {
  // Expert 0 is held by ranks 0 and 1 and wanted by ranks 2, 3 and 4 (one slot each).
  const std::vector<expert_id> old_row{0, 1, 0, 2, 1, 3, 2, 4, 3, 4};
  const std::vector<expert_id> new_row{0, 1, 0, 2, 0, 3, 0, 4, 0, 1};
  const auto p0 = exec::plan_layer(old_row, new_row, 5, 0);
  const auto p1 = exec::plan_layer(old_row, new_row, 5, 1);
  // 3 receivers over 2 senders: block of 1 each (ranks 2, 3), remainder rank 4 to sender 0.
  std::vector<int> to0, to1;
  for (const auto& s : p0.sends) {
    if (s.expert == 0) to0.push_back(s.peer);
  }
  for (const auto& s : p1.sends) {
    if (s.expert == 0) to1.push_back(s.peer);
  }
  CHECK(to0 == std::vector<int>{2, 4});
  CHECK(to1 == std::vector<int>{3});
  CHECK(exec::plan_layer(old_row, new_row, 5, 4).recvs.at(0).peer == 0);
}

TEST_CASE("rearrange on loopback: 2-8 ranks, bundles of 1-4 tensors, caps, every byte verified") {
  struct scenario {
    int ranks, layers, experts, redundant;
    std::vector<std::size_t> tensors;
    std::size_t staging;
  };
  const scenario cases[] = {
      {2, 2, 3, 1, {64}, 0},          {3, 3, 7, 2, {4096, 100}, 0},         {4, 2, 10, 6, {1000, 17, 3, 2048}, 0},
      {8, 2, 20, 4, {256, 32}, 0},    {4, 3, 28, 4, {1024, 256}, 4 * 1280},  // 4 rows of 8: a layer in chunks
      {5, 2, 12, 3, {333, 77, 5}, 0},
  };
  for (const auto& c : cases) {
    tools::exchange_config cfg;
    cfg.ranks = c.ranks;
    cfg.layers = c.layers;
    cfg.experts = c.experts;
    cfg.redundant = c.redundant;
    cfg.tensor_bytes = c.tensors;
    cfg.staging_bytes = c.staging;
    cfg.coalesce = c.ranks % 2 == 0;  // both transfer layouts: packed per peer and one message per tensor
    cfg.rounds = 10;
    cfg.seed = static_cast<std::uint64_t>(c.ranks * 100 + c.experts);
    CAPTURE(c.ranks);
    CAPTURE(c.experts);
    const auto res = tools::run_exchange(cfg, "", {});
    CHECK_MESSAGE(res.verified, res.failure);
    CHECK(res.rounds == 10);
    CHECK(res.bytes_moved > 0);
  }
}

TEST_CASE("coalescing: one message per peer and direction, same bytes as one per tensor") {
  const int ranks = 3;
  const tools::exchange_config cfg{
      .ranks = ranks, .layers = 1, .experts = 12, .redundant = 3, .tensor_bytes = {300, 64, 7}};
  std::mt19937_64 rng(5);
  const auto target = random_row(rng, cfg.experts, 15, true);
  struct outcome {
    exec::layer_stats stats;
    std::size_t sends = 0, recvs = 0;
  };
  const auto run = [&](bool coalesce, std::size_t pack_bytes) {
    auto world = comm::make_loopback_world(ranks);
    return on_ranks(ranks, [&](int r) {
      auto dev = device::make_host_device();
      auto stream = dev->create_stream();
      auto c = comm::make_communicator(comm::backend::loopback, comm::setup{.rank = r, .size = ranks, .world = world});
      auto start = tools::round_placement(cfg, 0, {});
      placement maps(start, cfg.experts, ranks);
      tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 10s);
      exec::rearranger re(model.shape(), r, *dev, *stream, *c,
                          {.verify = model.reference(), .coalesce = coalesce, .pack_bytes = pack_bytes});
      outcome out;
      out.stats = re.rearrange_layer(0, model.weights(), maps, target);
      const auto p = exec::plan_layer(start.row(0), target, ranks, r);
      out.sends = p.sends.size();
      out.recvs = p.recvs.size();
      return out;
    });
  };
  const auto packed = run(true, 0);
  const auto plain = run(false, 0);
  const auto tight = run(true, 1);  // no pair fits: falls back to one message per tensor
  for (int r = 0; r < ranks; ++r) {
    CAPTURE(r);
    const auto& k = packed[static_cast<std::size_t>(r)];
    const auto& u = plain[static_cast<std::size_t>(r)];
    REQUIRE(k.sends + k.recvs > 2);  // the case must have something to coalesce
    CHECK(u.stats.messages == static_cast<int>(3 * (k.sends + k.recvs)));
    CHECK(k.stats.messages <= 2 * (ranks - 1));
    CHECK(k.stats.bytes_received == u.stats.bytes_received);
    CHECK(k.stats.bytes_sent == u.stats.bytes_sent);
    CHECK(tight[static_cast<std::size_t>(r)].stats.messages == u.stats.messages);
  }
}

TEST_CASE("async staging (queue_layer, commit_layer) packs each peer's messages like the sync path") {
  const int ranks = 3;
  const tools::exchange_config cfg{
      .ranks = ranks, .layers = 2, .experts = 12, .redundant = 3, .tensor_bytes = {300, 64, 7}};
  std::mt19937_64 rng(5);
  const auto targets = std::vector{random_row(rng, cfg.experts, 15, true), random_row(rng, cfg.experts, 15, true)};
  const auto run = [&](bool coalesce) {
    auto world = comm::make_loopback_world(ranks);
    return on_ranks(ranks, [&](int r) {
      auto dev = device::make_host_device();
      auto stream = dev->create_stream();
      auto c = comm::make_communicator(comm::backend::loopback, comm::setup{.rank = r, .size = ranks, .world = world});
      const auto start = tools::round_placement(cfg, 0, {});
      tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 10s);
      exec::rearranger re(model.shape(), r, *dev, *stream, *c, {.coalesce = coalesce});
      auto area = dev->allocate(re.layer_area_bytes(), device::memory_kind::host);
      std::vector<exec::layer_stats> out;
      for (int l = 0; l < cfg.layers; ++l) {  // one area, reused: each layer commits before the next stages
        const auto& target = targets[static_cast<std::size_t>(l)];
        auto staged = re.queue_layer(l, model.weights(), start.row(static_cast<std::size_t>(l)), target, area.data());
        c->execute();
        re.commit_layer(staged, model.weights(), area.data(), *stream);
        stream->synchronize(10s);
        CHECK_MESSAGE(model.mismatch(l, target, r).empty(), model.mismatch(l, target, r));
        out.push_back(staged.stats);
      }
      return out;
    });
  };
  const auto packed = run(true);
  const auto plain = run(false);
  for (int r = 0; r < ranks; ++r) {
    for (int l = 0; l < cfg.layers; ++l) {
      CAPTURE(r);
      CAPTURE(l);
      const auto& k = packed[static_cast<std::size_t>(r)][static_cast<std::size_t>(l)];
      const auto& u = plain[static_cast<std::size_t>(r)][static_cast<std::size_t>(l)];
      REQUIRE(u.messages > 2 * (ranks - 1));  // the case must have something to coalesce
      CHECK(k.messages <= 2 * (ranks - 1));
      CHECK(k.bytes_received == u.bytes_received);
      CHECK(k.bytes_sent == u.bytes_sent);
      CHECK(k.bytes_copied_locally == u.bytes_copied_locally);
    }
  }
}

// Loopback with a registration log: what the rearranger asks of a backend that registers memory
// (nccl), and whether every transfer then touches registered memory only.
struct registration_log {
  std::vector<std::span<std::byte>> live;
  int registered = 0;
  int fail_at = 0;  // the registration (1, 2, ...) that throws; 0: none
  int outside = 0;  // transfers touching memory that was not registered when they ran
};

class registering_transport final : public comm::transport {
 public:
  registering_transport(std::unique_ptr<comm::communicator> inner, registration_log& log)
      : transport(inner->rank(), inner->size()), inner_(std::move(inner)), log_(log) {}
  comm::backend kind() const noexcept override { return inner_->kind(); }
  comm::capabilities caps() const noexcept override { return inner_->caps(); }
  comm::registration register_memory(std::span<std::byte> region) override {
    if (++log_.registered == log_.fail_at) throw error(errc::transport, "injected registration failure");
    log_.live.push_back(region);
    return comm::registration([&live = log_.live, region] {
      std::erase_if(live, [&](const auto& x) { return x.data() == region.data() && x.size() == region.size(); });
    });
  }
  void run(std::span<const comm::op> ops) override {
    inner_->set_stream(stream());
    for (const auto& o : ops) {
      const bool inside = std::any_of(log_.live.begin(), log_.live.end(), [&](const auto& x) {
        return o.data >= x.data() && o.data + o.bytes <= x.data() + x.size();
      });
      if (!inside) ++log_.outside;
      if (o.is_send) {
        inner_->add_send({o.data, o.bytes}, o.peer);
      } else {
        inner_->add_recv({o.data, o.bytes}, o.peer);
      }
    }
    inner_->execute();
  }

 private:
  std::unique_ptr<comm::communicator> inner_;
  registration_log& log_;
};

// The log is a base constructed before the communicator, so the transport may refer to it.
struct registering_comm final : registration_log, comm::communicator {
  explicit registering_comm(std::unique_ptr<comm::communicator> inner)
      : communicator(std::make_unique<registering_transport>(std::move(inner), *this)) {}
};

TEST_CASE("registered buffers: every transfer touches them, they follow set_communicator and the rearranger") {
  const int ranks = 3;
  const tools::exchange_config cfg{
      .ranks = ranks, .layers = 3, .experts = 12, .redundant = 3, .tensor_bytes = {300, 64, 7}, .seed = 4};
  // Registered: pipelined (no cap) and one layer at a time (a cap of exactly one layer); unregistered.
  const std::size_t one_layer = 5 * 371;  // 15 slots over 3 ranks, 371 bytes a bundle
  for (const auto& [reg, cap] : {std::pair{true, std::size_t{0}}, {true, one_layer}, {false, std::size_t{0}}}) {
    CAPTURE(reg);
    CAPTURE(cap);
    auto world1 = comm::make_loopback_world(ranks), world2 = comm::make_loopback_world(ranks);
    on_ranks(ranks, [&](int r) {
      auto dev = device::make_host_device();
      auto stream = dev->create_stream();
      const auto loopback = [&](auto& world) {
        return std::make_unique<registering_comm>(
            comm::make_communicator(comm::backend::loopback, comm::setup{.rank = r, .size = ranks, .world = world}));
      };
      auto c1 = loopback(world1), c2 = loopback(world2);
      auto current = tools::round_placement(cfg, 0, {});
      placement maps(current, cfg.experts, ranks);
      tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, current, 10s);
      {
        exec::rearranger re(model.shape(), r, *dev, *stream, *c1,
                            {.staging_bytes = cap, .verify = model.reference(), .register_buffers = reg});
        for (int round = 1; round <= 4; ++round) {
          if (round == 3) {
            const auto held = c1->live.size();
            re.set_communicator(*c2);
            CHECK(c1->live.empty());
            CHECK(c2->live.size() == held);
          }
          const auto next = tools::round_placement(cfg, round, current);
          re.rearrange(model.weights(), maps, next);
          current = next;
        }
        CHECK(c2->live.size() == (reg ? 2U : 0U));                            // staging and packing, both still held
        for (const auto& x : c2->live) CHECK((cap == 0 || x.size() <= cap));  // within the cap
      }
      CHECK(c2->live.empty());  // released with the rearranger, before its buffers
      if (reg) {                // a staging cap below one layer would leave messages unpacked: refused
        CHECK_EPLB_ERROR(
            exec::rearranger(model.shape(), r, *dev, *stream, *c1, {.staging_bytes = 371, .register_buffers = true}),
            errc::invalid_argument, "register_buffers needs coalesce and a staging cap");
      }
      if (reg) {
        CHECK(c1->outside == 0);
        CHECK(c2->outside == 0);
        CHECK(c1->registered >= 2);
      } else {
        CHECK(c1->registered + c2->registered == 0);
        CHECK(c1->outside > 0);
      }
      return 0;
    });
  }
}

TEST_CASE("registered buffers: a failed move to a new communicator changes nothing; outgrown ones stay registered") {
  // 3 ranks x 2 slots, experts 0..3. Round 1 has rank 0 send one bundle (its packing buffer is
  // made for two layers' worth, 4 bundles); round 2 has it send three (6 when pipelined), so it
  // grows.
  const int ranks = 3;
  const tools::exchange_config cfg{
      .ranks = ranks, .layers = 1, .experts = 4, .redundant = 2, .tensor_bytes = {300, 64, 7}};
  const auto row = [](std::vector<expert_id> v) {
    matrix<expert_id> m(1, v.size());
    std::copy(v.begin(), v.end(), m.flat().begin());
    return m;
  };
  const std::vector<matrix<expert_id>> rounds = {row({0, 1, 2, 0, 2, 3}), row({2, 3, 0, 1, 0, 1}),
                                                 row({0, 1, 2, 3, 2, 3})};
  auto world1 = comm::make_loopback_world(ranks), world2 = comm::make_loopback_world(ranks),
       world3 = comm::make_loopback_world(ranks);
  const auto results = on_ranks(ranks, [&](int r) -> std::string {
    auto dev = device::make_host_device();
    auto stream = dev->create_stream();
    const auto loopback = [&](auto& world) {
      return std::make_unique<registering_comm>(
          comm::make_communicator(comm::backend::loopback, comm::setup{.rank = r, .size = ranks, .world = world}));
    };
    auto c1 = loopback(world1), c2 = loopback(world3);  // both outlive the rearranger
    const auto current = row({0, 1, 2, 3, 0, 1});
    placement maps(current, cfg.experts, ranks);
    tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, current, 10s);
    exec::rearranger re(model.shape(), r, *dev, *stream, *c1, {.verify = model.reference(), .register_buffers = true});
    re.rearrange(model.weights(), maps, rounds[0]);
    const auto first = c1->live.size();
    // Rank 0 holds a packing buffer only (it stages nothing yet), rank 1 both: on rank 1 the staging
    // registration with the new communicator succeeds and the packing one throws.
    CHECK(first == (r == 1 ? 2U : 1U));
    {
      auto broken = loopback(world2);
      broken->fail_at = static_cast<int>(first);
      CHECK_EPLB_ERROR(re.set_communicator(*broken), errc::transport, "injected registration failure");
      CHECK(broken->live.empty());      // its one registration was released
      CHECK(c1->live.size() == first);  // still on c1, still registered
    }                                   // the failed communicator is gone; the rearranger must not touch it again
    re.rearrange(model.weights(), maps, rounds[1]);
    if (r == 0) CHECK(c1->live.size() == 3);  // the outgrown packing buffer is kept registered
    re.set_communicator(*c2);
    CHECK(c1->live.empty());
    CHECK(c2->live.size() == 2);  // the retired buffer went with the old communicator
    re.rearrange(model.weights(), maps, rounds[2]);
    CHECK(c1->outside + c2->outside == 0);
    const auto p2l = maps.phy2log(0);
    return std::vector<expert_id>(p2l.begin(), p2l.end()) == std::vector<expert_id>{0, 1, 2, 3, 2, 3}
               ? ""
               : fmt::format("rank {}: maps not as asked", r);
  });
  for (const auto& e : results) CHECK_MESSAGE(e.empty(), e);
}

TEST_CASE("rearrange with a staging cap uses several chunks and still verifies") {
  const int ranks = 4;
  auto world = comm::make_loopback_world(ranks);
  const auto chunks = on_ranks(ranks, [&](int r) {
    auto dev = device::make_host_device();
    auto stream = dev->create_stream();
    comm::setup s{.rank = r, .size = ranks, .world = world};
    auto c = comm::make_communicator(comm::backend::loopback, s);
    tools::exchange_config cfg{.ranks = ranks, .layers = 1, .experts = 28, .redundant = 4, .tensor_bytes = {512}};
    auto start = tools::round_placement(cfg, 0, {});
    placement maps(start, cfg.experts, ranks);
    tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 10s);
    exec::rearranger re(model.shape(), r, *dev, *stream, *c, {.staging_bytes = 4 * 512, .verify = model.reference()});
    std::mt19937_64 rng(9);
    auto target = random_row(rng, cfg.experts, 32, false);
    const auto st = re.rearrange_layer(0, model.weights(), maps, target);
    CHECK(re.staging_rows() == 4);
    CHECK(std::vector<expert_id>(maps.phy2log(0).begin(), maps.phy2log(0).end()) == target);
    return st.chunks;
  });
  CHECK(chunks[0] > 1);
  CHECK(chunks[0] == chunks[1]);  // every rank cuts the layer the same way
}

TEST_CASE("a staging cap of one expert bundle moves a swap inside each rank (it used to need two rows)") {
  auto world = comm::make_loopback_world(2);
  const auto results = on_ranks(2, [&](int r) -> std::string {
    auto dev = device::make_host_device();
    auto stream = dev->create_stream();
    auto c = comm::make_communicator(comm::backend::loopback, {.rank = r, .size = 2, .world = world});
    tools::exchange_config cfg{.ranks = 2, .layers = 1, .experts = 4, .redundant = 0, .tensor_bytes = {64}};
    auto start = tools::round_placement(cfg, 0, {});
    placement maps(start, 4, 2);
    tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 10s);
    exec::rearranger re(model.shape(), r, *dev, *stream, *c, {.staging_bytes = 64, .verify = model.reference()});
    CHECK(re.staging_rows() == 1);
    const std::vector<expert_id> swapped{1, 0, 3, 2};  // a cycle of two slots on each rank
    const auto st = re.rearrange_layer(0, model.weights(), maps, swapped);
    CHECK(st.bytes_sent == 0);
    CHECK(st.bytes_copied_locally == 2 * 64);  // the two slots, straight or from the row
    if (!std::equal(swapped.begin(), swapped.end(), maps.phy2log(0).begin())) return "maps not as asked";
    return model.mismatch(0, maps.phy2log(0), r);
  });
  for (const auto& e : results) CHECK_MESSAGE(e.empty(), e);
}

TEST_CASE("a device fault mid-layer leaves that layer untouched and names it") {
  auto world = comm::make_loopback_world(2);
  const auto results = on_ranks(2, [&](int r) -> std::string {
    // Rank 1's device fails its 53rd stream operation: the model's fill takes 48 (a copy and a
    // synchronisation for 4 slots x 2 tensors x 3 layers), so the fault lands in the rearrangement.
    auto dev = device::make_host_device(r == 1 ? device::host_faults{.fail_at_op = 53} : device::host_faults{});
    auto stream = dev->create_stream();
    auto c = comm::make_communicator(comm::backend::loopback,
                                     {.rank = r, .size = 2, .world = world, .opts = {.timeout = 5s}});
    tools::exchange_config cfg{.ranks = 2, .layers = 3, .experts = 6, .redundant = 2, .tensor_bytes = {128, 32}};
    auto start = tools::round_placement(cfg, 0, {});
    placement maps(start, 6, 2);
    tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 5s);
    std::vector<std::vector<std::byte>> before;
    for (int l = 0; l < 3; ++l) before.push_back(r == 1 ? std::vector<std::byte>{} : model.snapshot(l));
    exec::rearranger re(model.shape(), r, *dev, *stream, *c, {.timeout = 5s, .verify = model.reference()});
    matrix<expert_id> target(3, 8);
    for (int l = 0; l < 3; ++l) {
      const std::vector<expert_id> row{5, 4, 3, 2, 1, 0, 5, 0};
      std::copy(row.begin(), row.end(), target.row(static_cast<std::size_t>(l)).begin());
    }
    int done = 0;
    try {
      for (int l = 0; l < 3; ++l) {
        re.rearrange_layer(l, model.weights(), maps, target.row(static_cast<std::size_t>(l)));
        ++done;
      }
    } catch (const error& e) {
      if (r == 1) return fmt::format("{}|{}", done, e.what());
      comm::mark_dead(*world, 0);
      // Rank 0: the failed layer and every later layer are untouched, maps too.
      for (int l = done; l < 3; ++l) {
        CHECK(model.snapshot(l) == before[static_cast<std::size_t>(l)]);
        CHECK(maps.phy2log(l)[0] == start(static_cast<std::size_t>(l), 0));
      }
      return fmt::format("{}|{}", done, e.what());
    }
    if (r == 1) comm::mark_dead(*world, 1);
    return "no error";
  });
  INFO(results[0]);
  INFO(results[1]);
  CHECK(results[1].find("layer ") != std::string::npos);
  CHECK(results[1].find("injected fault") != std::string::npos);
}

TEST_CASE("pipelined rearrange: a fault in a later layer keeps committed layers and leaves the rest untouched") {
  const int layers = 5;
  // 110-170: a transfer fails (both ranks stop); 190, 210: rank 1's slot writes fail after its
  // transfers were done (rank 0 finishes; rank 1 must keep that layer's old map).
  for (const int fail_at : {110, 140, 170, 190, 210}) {
    CAPTURE(fail_at);
    auto world = comm::make_loopback_world(2);
    const auto results = on_ranks(2, [&](int r) -> std::string {
      // The model's fill takes 80 operations on rank 1 (5 layers x 2 tensors x 4 slots, a copy and
      // a synchronisation each); later operations belong to the rearrangement.
      auto dev = device::make_host_device(r == 1 ? device::host_faults{.max_delay = 1ms, .fail_at_op = fail_at}
                                                 : device::host_faults{});
      auto stream = dev->create_stream();
      auto c = comm::make_communicator(comm::backend::loopback,
                                       {.rank = r, .size = 2, .world = world, .opts = {.timeout = 5s}});
      tools::exchange_config cfg{.ranks = 2, .layers = layers, .experts = 6, .redundant = 2, .tensor_bytes = {128, 32}};
      auto start = tools::round_placement(cfg, 0, {});
      placement maps(start, 6, 2);
      tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 5s);
      std::vector<std::vector<std::byte>> before;
      for (int l = 0; l < layers; ++l) before.push_back(r == 1 ? std::vector<std::byte>{} : model.snapshot(l));
      exec::rearranger re(model.shape(), r, *dev, *stream, *c, {.timeout = 5s, .verify = model.reference()});
      matrix<expert_id> target(layers, 8);
      for (int l = 0; l < layers; ++l) {
        const std::vector<expert_id> row{5, 4, 3, 2, 1, 0, 5, 0};
        std::copy(row.begin(), row.end(), target.row(static_cast<std::size_t>(l)).begin());
      }
      try {
        re.rearrange(model.weights(), maps, target);
      } catch (const error& e) {
        comm::mark_dead(*world, r);
        if (r == 1) {
          // Its device failed, so its bytes cannot be read back; its maps must still be a prefix of
          // committed layers, and a layer whose writes failed must keep its old map.
          int committed = 0;
          while (committed < layers &&
                 std::ranges::equal(maps.phy2log(committed), target.row(static_cast<std::size_t>(committed))))
            ++committed;
          for (int l = committed; l < layers; ++l)
            CHECK(std::ranges::equal(maps.phy2log(l), start.row(static_cast<std::size_t>(l))));
          const std::string what = e.what();
          if (const auto at = what.find(": writing its slots failed"); at != std::string::npos) {
            const int bad = std::stoi(what.substr(what.rfind("layer ", at) + 6));
            CHECK(committed <= bad);
          }
          return what;
        }
        // Rank 0: layers are either committed (maps say the target, bytes verify) or untouched.
        int committed = 0;
        for (int l = 0; l < layers; ++l) {
          const auto row = maps.phy2log(l);
          if (std::equal(row.begin(), row.end(), target.row(static_cast<std::size_t>(l)).begin())) {
            CHECK(committed == l);  // committed layers are a prefix
            ++committed;
            CHECK_NOTHROW(re.verify_layer(l, model.weights(), maps, model.reference()));
          } else {
            CHECK(std::equal(row.begin(), row.end(), start.row(static_cast<std::size_t>(l)).begin()));
            CHECK(model.snapshot(l) == before[static_cast<std::size_t>(l)]);
          }
        }
        CHECK(committed < layers);
        return fmt::format("{} committed|{}", committed, e.what());
      }
      comm::mark_dead(*world, r);
      return "no error";
    });
    INFO(results[0]);
    INFO(results[1]);
    CHECK(results[1].find("layer ") != std::string::npos);
    CHECK(results[1].find("injected fault") != std::string::npos);
    if (fail_at < 190) CHECK(results[0].find("layer ") != std::string::npos);
    if (fail_at >= 190)
      CHECK(results[1].find("writing its slots failed, the layer is partly written") != std::string::npos);
  }
}

TEST_CASE("elastic scale-down moves the leaving rank's experts to the survivors") {
  const int ranks = 4, experts = 10, per_rank = 4;
  auto world = comm::make_loopback_world(ranks);
  const std::vector<int> mapping{0, 1, 2, -1};  // rank 3 leaves
  const auto results = on_ranks(ranks, [&](int r) -> std::string {
    auto dev = device::make_host_device();
    auto stream = dev->create_stream();
    auto c = comm::make_communicator(comm::backend::loopback, {.rank = r, .size = ranks, .world = world});
    tools::exchange_config cfg{
        .ranks = ranks, .layers = 2, .experts = experts, .redundant = 6, .tensor_bytes = {256, 64}};
    auto start = tools::round_placement(cfg, 0, {});
    placement maps(start, experts, ranks);
    tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 10s);
    // The policy places the experts over the 3 survivors (12 slots), then the map is expanded back.
    matrix<double> load(2, experts, 1.0);
    const auto survivors = rebalance_default({load, 3 * per_rank, 1, 1, 3});
    const auto target = exec::expand_for_scale_down(survivors, mapping, per_rank);
    exec::rearranger re(model.shape(), r, *dev, *stream, *c, {.verify = model.reference()});
    try {
      re.rearrange(model.weights(), maps, target);
    } catch (const error& e) {
      return e.what();
    }
    for (int l = 0; l < 2; ++l) {
      for (int s = 12; s < 16; ++s) CHECK(maps.phy2log(l)[s] == empty_slot);
    }
    return "";
  });
  for (const auto& r : results) CHECK_MESSAGE(r.empty(), r);
}

TEST_CASE("elastic scale-up fills the new ranks' empty slots") {
  const int experts = 6, per_rank = 3;
  auto world = comm::make_loopback_world(4);
  const std::vector<int> mapping{0, 1};  // 2 ranks become 4
  const auto results = on_ranks(4, [&](int r) -> std::string {
    auto dev = device::make_host_device();
    auto stream = dev->create_stream();
    auto c = comm::make_communicator(comm::backend::loopback, {.rank = r, .size = 4, .world = world});
    tools::exchange_config small{.ranks = 2, .layers = 2, .experts = experts, .redundant = 0, .tensor_bytes = {128}};
    const auto old_small = tools::round_placement(small, 0, {});
    const auto old_map = exec::expand_for_scale_up(old_small, mapping, 4, per_rank);
    tools::exchange_config big{.ranks = 4, .layers = 2, .experts = experts, .redundant = 6, .tensor_bytes = {128}};
    placement maps(old_map, experts, 4);
    tools::pattern_model model(tools::pattern_shape(big), r, *dev, *stream, old_map, 10s);
    matrix<double> load(2, experts, 1.0);
    load(0, 0) = 50;
    const auto target = rebalance_default({load, 12, 1, 1, 4, &old_map});
    exec::rearranger re(model.shape(), r, *dev, *stream, *c, {.verify = model.reference()});
    try {
      re.rearrange(model.weights(), maps, target);
    } catch (const error& e) {
      return e.what();
    }
    for (int s = 6; s < 12; ++s) CHECK(maps.phy2log(0)[s] >= 0);
    return "";
  });
  for (const auto& r : results) CHECK_MESSAGE(r.empty(), r);
}

TEST_CASE("rearrange argument errors") {
  auto world = comm::make_loopback_world(2);
  auto dev = device::make_host_device();
  auto stream = dev->create_stream();
  auto c = comm::make_communicator(comm::backend::loopback, {.rank = 0, .size = 2, .world = world});
  tools::exchange_config cfg{.ranks = 2, .layers = 1, .experts = 4, .redundant = 0, .tensor_bytes = {64}};
  auto shape = tools::pattern_shape(cfg);
  auto bad = shape;
  bad.bundle[0].stride = 8;
  CHECK_EPLB_ERROR(exec::rearranger(bad, 0, *dev, *stream, *c), errc::invalid_argument,
                   "stride 8 is smaller than bytes_per_expert 64");
  CHECK_EPLB_ERROR(exec::rearranger(shape, 1, *dev, *stream, *c), errc::invalid_argument,
                   "communicator is rank 0 of 2");
  CHECK_EPLB_ERROR(exec::rearranger(shape, 0, *dev, *stream, *c, {.staging_bytes = 10}), errc::invalid_argument,
                   "smaller than one expert bundle");
  auto start = tools::round_placement(cfg, 0, {});
  placement maps(start, 4, 2);
  tools::pattern_model model(shape, 0, *dev, *stream, start, 5s);
  exec::rearranger re(shape, 0, *dev, *stream, *c);
  const std::vector<expert_id> missing{0, 0, 1, 2};
  CHECK_EPLB_ERROR(re.rearrange_layer(0, model.weights(), maps, missing), errc::invalid_map,
                   "new phy2log[0]: logical expert 3 has no replica");
  const std::vector<expert_id> short_row{0, 1, 2};
  CHECK_EPLB_ERROR(re.rearrange_layer(0, model.weights(), maps, short_row), errc::invalid_map,
                   "has 3 slots, expected 4");
  CHECK_EPLB_ERROR(exec::expand_for_scale_down(start, std::vector<int>{0, 5}, 2), errc::invalid_map,
                   "rank_mapping[1] = 5 is out of range -1..1");
  CHECK_EPLB_ERROR(exec::expand_for_scale_down(start, std::vector<int>{0, -1}, 2), errc::invalid_map,
                   "has 4 slots, 1 surviving ranks x 2 slots expected");
}

TEST_CASE("bundles that differ between ranks are a clear error, not corruption") {
  auto world = comm::make_loopback_world(2);
  const auto results = on_ranks(2, [&](int r) -> std::string {
    auto dev = device::make_host_device();
    auto stream = dev->create_stream();
    auto c = comm::make_communicator(comm::backend::loopback,
                                     {.rank = r, .size = 2, .world = world, .opts = {.timeout = 1s}});
    // Rank 1 believes the expert tensor is twice as large as rank 0 does.
    tools::exchange_config cfg{.ranks = 2,
                               .layers = 1,
                               .experts = 4,
                               .redundant = 0,
                               .tensor_bytes = {r == 0 ? std::size_t{64} : std::size_t{128}}};
    auto start = tools::round_placement(cfg, 0, {});
    placement maps(start, 4, 2);
    tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 5s);
    const auto before = model.snapshot(0);
    exec::rearranger re(model.shape(), r, *dev, *stream, *c);
    const std::vector<expert_id> crossed{2, 3, 0, 1};  // every expert changes rank
    try {
      re.rearrange_layer(0, model.weights(), maps, crossed);
    } catch (const error& e) {
      CHECK(model.snapshot(0) == before);  // live weights untouched
      return e.what();
    }
    return "no error";
  });
  // Whichever rank receives first sees the mismatch itself; the other learns of it as a failure
  // naming its peer (the failed rank withdraws what it had posted).
  const bool precise =
      results[0].find("which sent") != std::string::npos || results[1].find("which sent") != std::string::npos;
  CHECK_MESSAGE(precise, results[0], " | ", results[1]);
  for (int r = 0; r < 2; ++r) {
    CHECK_MESSAGE(results[r].find("layer 0") != std::string::npos, results[r]);
    CHECK_MESSAGE((results[r].find("which sent") != std::string::npos ||
                   results[r].find(fmt::format("rank {}", 1 - r)) != std::string::npos),
                  results[r]);
  }
}

// Issue 15: a wait that times out leaves the stream's copies queued; the staging, packing and
// verification buffers they touch must outlive them (AddressSanitizer reports an early free).
TEST_CASE("rearranger: after a timed-out wait, the stream's queued copies land in memory still allocated") {
  for (const bool pipeline : {false, true}) {
    CAPTURE(pipeline);
    auto dev = device::make_host_device();
    auto stream = dev->create_stream();
    const tools::exchange_config cfg{.ranks = 1, .layers = 2, .experts = 4, .redundant = 2, .tensor_bytes = {64, 24}};
    const auto start = tools::round_placement(cfg, 0, {});
    const auto next = tools::round_placement(cfg, 1, start);  // permutations: local copies through staging
    REQUIRE(next != start);
    tools::pattern_model model(tools::pattern_shape(cfg), 0, *dev, *stream, start, 10s);
    auto comm =
        comm::make_communicator(comm::backend::loopback, {.rank = 0, .size = 1, .world = comm::make_loopback_world(1)});
    placement maps(start, cfg.experts, 1);
    // The engine's work ahead of the move, still running: completed by hand below.
    const auto engine = std::make_shared<device::detail::event_state>();
    {
      exec::rearranger r(model.shape(), 0, *dev, *stream, *comm, {.timeout = 50ms, .pipeline = pipeline});
      stream->wait(device::event(engine));
      CHECK_EPLB_ERROR(r.rearrange(model.weights(), maps, next), errc::timeout, "");
      CHECK_EPLB_ERROR(r.verify_layer(0, model.weights(), maps, model.reference()), errc::timeout, "not complete");
    }
    CHECK(maps.phy2log() == start);  // nothing committed
    CHECK(dev->releases_waiting() > 0);
    engine->complete(nullptr);
    try {
      stream->synchronize(10s);
    } catch (const error& e) {
      // Pipelined, the stream also waited on the rearranger's copy stream, which went with that
      // work queued: a host stream cancels it, and the cancellation fails this stream.
      CHECK(pipeline);
      CHECK(e.code() == errc::cancelled);
    }
    CHECK(dev->collect_released() == 0);
  }
}

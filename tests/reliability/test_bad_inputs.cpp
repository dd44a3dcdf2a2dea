// Bad inputs, one table (issue #8). Every row feeds one invalid input to the public API and expects
// an eplb::error with a given errc and a message naming what was wrong. Every row runs against a
// fresh one-rank model on the host device (a placement, live weights with recognisable bytes, a
// loopback communicator and a rearranger); after the error the maps, every live weight byte (slots
// and the gaps between them) and the communicator's queue must be exactly as before.
#include <doctest/doctest.h>

#include <fmt/format.h>
#include <future>

#include <cstring>
#include <functional>

#include "check_error.hpp"
#include "eplb/comm/communicator.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/config.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/core/policy.hpp"
#include "eplb/exec/rearrange.hpp"
#include "eplb/state.hpp"
#include "on_ranks.hpp"
#include "tools/exchange.hpp"
#include "tools/plan_json.hpp"
#include "tools/simulate.hpp"
#include "util/deadline.hpp"

using namespace eplb;
using eplb::testing::on_ranks;
using namespace std::chrono_literals;

namespace {

constexpr int layers = 2;
constexpr int experts = 6;
constexpr int redundant = 2;
constexpr int slots = experts + redundant;  // all on the one rank

// Everything a failed call must leave alone.
struct observed {
  matrix<expert_id> phy2log;
  matrix<std::int32_t> replica_counts;
  std::vector<std::int32_t> log2phy;
  std::vector<std::vector<std::byte>> storage;  // per layer and tensor: every byte of the live region
  std::size_t pending = 0;                      // operations queued on the communicator
  friend bool operator==(const observed&, const observed&) = default;
};

struct fixture {
  std::unique_ptr<device::device> dev = device::make_host_device();
  std::unique_ptr<device::stream> stream = dev->create_stream();
  std::shared_ptr<comm::loopback_world> world = comm::make_loopback_world(1);
  std::unique_ptr<comm::communicator> c =
      comm::make_communicator(comm::backend::loopback, {.rank = 0, .size = 1, .world = world, .opts = {.timeout = 2s}});
  tools::exchange_config cfg{
      .ranks = 1, .layers = layers, .experts = experts, .redundant = redundant, .tensor_bytes = {64, 24}};
  exec::model_shape shape = tools::pattern_shape(cfg);
  matrix<expert_id> start = tools::round_placement(cfg, 0, {});  // slot p holds expert p % 6
  placement maps{start, experts, 1};
  tools::pattern_model model{shape, 0, *dev, *stream, start, 5s};
  exec::rearranger re{shape, 0, *dev, *stream, *c, {.timeout = 5s, .verify = model.reference()}};

  const exec::rank_weights& weights() const { return model.weights(); }

  observed observe() const {
    stream->synchronize(5s);  // host device: live weights are host memory once the stream is idle
    observed o{maps.phy2log(), maps.replica_counts(), {}, {}, c->pending()};
    for (int l = 0; l < maps.layers(); ++l) {
      for (int e = 0; e < maps.num_logical(); ++e) {
        const auto s = maps.log2phy(l, e);
        o.log2phy.insert(o.log2phy.end(), s.begin(), s.end());
      }
    }
    for (int l = 0; l < layers; ++l) {
      for (std::size_t t = 0; t < shape.bundle.size(); ++t) {
        const auto* base = weights().base[static_cast<std::size_t>(l)][t];
        o.storage.emplace_back(base, base + shape.bundle[t].stride * static_cast<std::size_t>(slots));
      }
    }
    return o;
  }

  // EplbState parameters that are valid for this model; rows break one of them.
  state_params params() const {
    state_params p;
    p.cfg.communicator = "loopback";
    p.cfg.num_redundant_experts = redundant;
    p.cfg.timeout = 2s;
    p.model = {shape, 1, 1};
    p.rank = 0;
    p.dev = dev.get();
    p.serving_stream = stream.get();
    p.weights = weights();
    p.store = comm::make_memory_store();
    p.comm_setup.world = world;
    p.log = [](std::string_view) {};
    return p;
  }
};

// A valid new placement of one layer that moves every expert of this rank.
const std::vector<expert_id> moving_row{5, 4, 3, 2, 1, 0, 5, 4};

matrix<expert_id> rows(std::initializer_list<std::vector<expert_id>> list) {
  matrix<expert_id> m(list.size(), list.begin()->size());
  std::size_t l = 0;
  for (const auto& r : list) std::copy(r.begin(), r.end(), m.row(l++).begin());
  return m;
}

config from_struct(const std::function<void(config&)>& change) {
  config c;
  change(c);
  c.validate();
  return c;
}

void make_state(state_params p) {
  eplb_state s(std::move(p));
}

std::string repeat(std::string_view part, int times) {
  std::string out;
  for (int i = 0; i < times; ++i) out += part;
  return out;
}

// JSON arrays nested `depth` levels deep: "[[[...]]]".
std::string nested(int depth) {
  return std::string(static_cast<std::size_t>(depth), '[') + std::string(static_cast<std::size_t>(depth), ']');
}

// 100,000 characters starting with a newline and a control character (JSON escapes for them).
std::string hostile_text() {
  return "a\\nb\\u0001c" + std::string(100'000, 'x');
}

// A policy input of one layer: the first four loads `big`, the rest 1 (as in issue 15's example).
rebalance_input policy_input(double big) {
  static matrix<double> load(1, 8);
  for (std::size_t e = 0; e < 8; ++e) load(0, e) = e < 4 ? big : 1.0;
  return {load, 8, 4, 2, 2};
}

// Two loopback ranks whose bundles differ (rank 1's tensor is twice as large): the rearrangement
// must fail on both with live weights untouched. The same input as the test "bundles that differ
// between ranks are a clear error, not corruption" in tests/exec/test_exec.cpp; rethrows the error
// of the rank that saw the size mismatch itself.
void bundles_differ_between_ranks() {
  auto world = comm::make_loopback_world(2);
  const auto errors = on_ranks(2, [&](int r) -> std::exception_ptr {
    auto dev = device::make_host_device();
    auto stream = dev->create_stream();
    auto c = comm::make_communicator(comm::backend::loopback,
                                     {.rank = r, .size = 2, .world = world, .opts = {.timeout = 1s}});
    tools::exchange_config cfg{
        .ranks = 2, .layers = 1, .experts = 4, .redundant = 0, .tensor_bytes = {r == 0 ? 64U : 128U}};
    const auto start = tools::round_placement(cfg, 0, {});
    placement maps(start, 4, 2);
    tools::pattern_model model(tools::pattern_shape(cfg), r, *dev, *stream, start, 5s);
    const auto before = model.snapshot(0);
    exec::rearranger re(model.shape(), r, *dev, *stream, *c);
    std::exception_ptr failure;
    try {
      re.rearrange_layer(0, model.weights(), maps, std::vector<expert_id>{2, 3, 0, 1});
    } catch (...) {
      failure = std::current_exception();
    }
    CHECK_MESSAGE(model.snapshot(0) == before, "rank ", r, ": live weights changed");
    CHECK_MESSAGE(maps.phy2log() == start, "rank ", r, ": maps changed");
    return failure;
  });
  for (const auto& e : errors) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const error& err) {
      if (std::string(err.what()).find("which sent") != std::string::npos) throw;
    }
  }
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

struct bad_input {
  std::string name;
  std::function<void(fixture&)> action;  ///< feeds one bad input; must throw
  errc code;
  std::string text;  ///< a substring of the expected message
};

// Gives the fixture's device back its own allocator when a row ends, so the fixture still works.
struct hook_guard {
  device::device& dev;
  ~hook_guard() { dev.set_allocator({}); }
};

device::allocator_hook empty_hook() {
  return {[](std::size_t, device::memory_kind) -> void* { return nullptr; },
          [](void*, std::size_t, device::memory_kind) {}};
}

// Issues 17 and 18: reserve() and the allocator hook.
void add_reserve_rows(std::vector<bad_input>& t) {
  using f_t = fixture&;
  t.push_back({"state: reserve() after stop()",
               [](f_t f) {
                 eplb_state s(f.params());
                 s.stop();
                 s.reserve();
               },
               errc::cancelled, "eplb_state::reserve: the state was stopped"});
  t.push_back({"state: reserve() when the allocator hook has no memory",
               [](f_t f) {
                 eplb_state s(f.params());
                 hook_guard g{*f.dev};
                 f.dev->set_allocator(empty_hook());
                 s.reserve();
               },
               errc::out_of_memory, "allocator hook: returned no memory for 1408 bytes of host memory"});
  t.push_back({"state: reserve_memory at construction when the allocator hook has no memory",
               [](f_t f) {
                 auto p = f.params();
                 p.cfg.reserve_memory = true;
                 hook_guard g{*f.dev};
                 f.dev->set_allocator(empty_hook());
                 make_state(std::move(p));
               },
               errc::out_of_memory, "allocator hook: returned no memory for"});
  t.push_back({"device: an allocator hook with allocate but no free",
               [](f_t f) {
                 hook_guard g{*f.dev};
                 f.dev->set_allocator({[](std::size_t, device::memory_kind) -> void* { return nullptr; }, {}});
               },
               errc::invalid_argument,
               "set_allocator: allocate and free must both be set or both be empty (allocate set, free empty)"});
  t.push_back({"config: reserve_memory not a boolean",
               [](f_t) { (void)config::from_json(R"({"reserve_memory": "yes"})"); }, errc::invalid_config,
               "reserve_memory: \"yes\" is not allowed (must be true or false)"});
}

std::vector<bad_input> table() {
  using f_t = fixture&;
  std::vector<bad_input> t = {
      // --- config: every field, bad JSON, unknown keys, wrong types (config::from_json, validate)
      {"config: not JSON", [](f_t) { (void)config::from_json(R"({"window_size": )"); }, errc::invalid_config,
       "config: not valid JSON"},
      {"config: empty text", [](f_t) { (void)config::from_json(""); }, errc::invalid_config, "config: not valid JSON"},
      {"config: not an object", [](f_t) { (void)config::from_json("[1, 2]"); }, errc::invalid_config,
       "config: must be a JSON object, got array"},
      {"config: unknown key", [](f_t) { (void)config::from_json(R"({"windowsize": 10})"); }, errc::invalid_config,
       "windowsize: unknown field (known: window_size"},
      {"config: number out of range", [](f_t) { (void)config::from_json(R"({"window_size": 1e999})"); },
       errc::invalid_config, "config: not valid JSON"},
      {"window_size: 0", [](f_t) { (void)config::from_json(R"({"window_size": 0})"); }, errc::invalid_config,
       "window_size: 0 is not allowed (must be > 0)"},
      {"window_size: negative", [](f_t) { (void)config::from_json(R"({"window_size": -3})"); }, errc::invalid_config,
       "window_size: -3 is not allowed (must be > 0)"},
      {"window_size: beyond int", [](f_t) { (void)config::from_json(R"({"window_size": 4294967297})"); },
       errc::invalid_config, "window_size: 4294967297 is out of range (-2147483648..2147483647)"},
      {"window_size: a float", [](f_t) { (void)config::from_json(R"({"window_size": 1.5})"); }, errc::invalid_config,
       "window_size: 1.5 is not allowed (must be an integer)"},
      {"window_size: a string", [](f_t) { (void)config::from_json(R"({"window_size": "10"})"); }, errc::invalid_config,
       R"(window_size: "10" is not allowed (must be an integer))"},
      {"window_size: null", [](f_t) { (void)config::from_json(R"({"window_size": null})"); }, errc::invalid_config,
       "window_size: null is not allowed (must be an integer)"},
      {"step_interval: 0", [](f_t) { (void)config::from_json(R"({"step_interval": 0})"); }, errc::invalid_config,
       "step_interval: 0 is not allowed (must be > 0)"},
      {"step_interval: beyond int", [](f_t) { (void)config::from_json(R"({"step_interval": -4294967295})"); },
       errc::invalid_config, "step_interval: -4294967295 is out of range"},
      {"step_interval: a bool", [](f_t) { (void)config::from_json(R"({"step_interval": true})"); },
       errc::invalid_config, "step_interval: true is not allowed (must be an integer)"},
      {"num_redundant_experts: -1", [](f_t) { (void)config::from_json(R"({"num_redundant_experts": -1})"); },
       errc::invalid_config, "num_redundant_experts: -1 is not allowed (must be >= 0)"},
      {"num_redundant_experts: an array", [](f_t) { (void)config::from_json(R"({"num_redundant_experts": [2]})"); },
       errc::invalid_config, "num_redundant_experts: [2] is not allowed (must be an integer)"},
      {"log_balancedness: a string", [](f_t) { (void)config::from_json(R"({"log_balancedness": "yes"})"); },
       errc::invalid_config, R"(log_balancedness: "yes" is not allowed (must be true or false))"},
      {"log_balancedness: 1", [](f_t) { (void)config::from_json(R"({"log_balancedness": 1})"); }, errc::invalid_config,
       "log_balancedness: 1 is not allowed (must be true or false)"},
      {"log_balancedness_interval: 0", [](f_t) { (void)config::from_json(R"({"log_balancedness_interval": 0})"); },
       errc::invalid_config, "log_balancedness_interval: 0 is not allowed (must be > 0)"},
      {"use_async: a string", [](f_t) { (void)config::from_json(R"({"use_async": "true"})"); }, errc::invalid_config,
       R"(use_async: "true" is not allowed (must be true or false))"},
      {"elastic: 0", [](f_t) { (void)config::from_json(R"({"elastic": 0})"); }, errc::invalid_config,
       "elastic: 0 is not allowed (must be true or false)"},
      {"policy: unknown", [](f_t) { (void)config::from_json(R"({"policy": "greedy"})"); }, errc::invalid_config,
       R"(policy: "greedy" is not allowed (allowed: "default", "min_move"))"},
      {"policy: a number", [](f_t) { (void)config::from_json(R"({"policy": 2})"); }, errc::invalid_config,
       "policy: 2 is not allowed (must be a string)"},
      {"communicator: unknown", [](f_t) { (void)config::from_json(R"({"communicator": "mpi"})"); },
       errc::invalid_config,
       R"(communicator: "mpi" is not allowed (allowed: auto, nccl, gloo, stateless_nccl, cuda_ipc, loopback)"},
      {"communicator: wrong case", [](f_t) { (void)config::from_json(R"({"communicator": "Gloo"})"); },
       errc::invalid_config, R"(communicator: "Gloo" is not allowed)"},
      {"communicator: nccl with use_async",
       [](f_t) { (void)config::from_json(R"({"use_async": true, "communicator": "nccl"})"); }, errc::invalid_config,
       R"(communicator: "nccl" is not allowed with use_async = true)"},
      {"communicator: stateless_nccl with use_async and elastic",
       [](f_t) {
         (void)config::from_json(R"({"use_async": true, "elastic": true, "communicator": "stateless_nccl"})");
       },
       errc::invalid_config, R"(communicator: "stateless_nccl" is not allowed with use_async = true)"},
      {"staging_bytes: -1", [](f_t) { (void)config::from_json(R"({"staging_bytes": -1})"); }, errc::invalid_config,
       "staging_bytes: -1 is not allowed (must be >= 0)"},
      {"staging_bytes: beyond range", [](f_t) { (void)config::from_json(R"({"staging_bytes": 1000000000000001})"); },
       errc::invalid_config, "staging_bytes: 1000000000000001 is out of range"},
      {"register_buffers: with use_async",
       [](f_t) { (void)config::from_json(R"({"use_async": true, "register_buffers": true})"); }, errc::invalid_config,
       "register_buffers: true is not allowed with use_async = true"},
      {"register_buffers: not a boolean", [](f_t) { (void)config::from_json(R"({"register_buffers": 1})"); },
       errc::invalid_config, "register_buffers: 1 is not allowed (must be true or false)"},
      {"commit_lag_steps: -1", [](f_t) { (void)config::from_json(R"({"commit_lag_steps": -1})"); },
       errc::invalid_config, "commit_lag_steps: -1 is not allowed (must be in 0..1000)"},
      {"commit_lag_steps: 1001", [](f_t) { (void)config::from_json(R"({"commit_lag_steps": 1001})"); },
       errc::invalid_config, "commit_lag_steps: 1001 is not allowed (must be in 0..1000)"},
      {"min_improvement: 1.5", [](f_t) { (void)config::from_json(R"({"min_improvement": 1.5})"); },
       errc::invalid_config, "min_improvement: 1.5 is not allowed (must be in -1..1)"},
      {"min_improvement: -2", [](f_t) { (void)config::from_json(R"({"min_improvement": -2})"); }, errc::invalid_config,
       "min_improvement: -2 is not allowed (must be in -1..1)"},
      {"min_improvement: \"x\"", [](f_t) { (void)config::from_json(R"({"min_improvement": "x"})"); },
       errc::invalid_config, "min_improvement: \"x\" is not allowed (must be a number)"},
      {"history_size: 0", [](f_t) { (void)config::from_json(R"({"history_size": 0})"); }, errc::invalid_config,
       "history_size: 0 is not allowed (must be in 1..100000)"},
      {"history_size: 100001", [](f_t) { (void)config::from_json(R"({"history_size": 100001})"); },
       errc::invalid_config, "history_size: 100001 is not allowed (must be in 1..100000)"},
      {"history_size: a string", [](f_t) { (void)config::from_json(R"({"history_size": "8"})"); }, errc::invalid_config,
       R"(history_size: "8" is not allowed (must be an integer))"},
      {"timeout_ms: 0", [](f_t) { (void)config::from_json(R"({"timeout_ms": 0})"); }, errc::invalid_config,
       "timeout_ms: 0 is not allowed (must be in 1..86400000 ms"},
      {"timeout_ms: a string", [](f_t) { (void)config::from_json(R"({"timeout_ms": "5s"})"); }, errc::invalid_config,
       R"(timeout_ms: "5s" is not allowed (must be an integer))"},
      {"config struct: negative timeout", [](f_t) { (void)from_struct([](config& c) { c.timeout = -1ms; }); },
       errc::invalid_config, "timeout_ms: -1 is not allowed (must be in 1..86400000 ms"},
      // --- issue 15: hostile values (timeouts that overflow deadlines, deep nesting, huge echoes)
      {"config struct: timeout of milliseconds::max()",
       [](f_t) { (void)from_struct([](config& c) { c.timeout = std::chrono::milliseconds::max(); }); },
       errc::invalid_config,
       "timeout_ms: 9223372036854775807 is not allowed (must be in 1..86400000 ms, i.e. 1 ms to 24 h)"},
      {"config struct: timeout of one day and 1 ms",
       [](f_t) { (void)from_struct([](config& c) { c.timeout = std::chrono::hours(24) + 1ms; }); },
       errc::invalid_config, "timeout_ms: 86400001 is not allowed (must be in 1..86400000 ms"},
      {"timeout_ms: beyond a day", [](f_t) { (void)config::from_json(R"({"timeout_ms": 86400001})"); },
       errc::invalid_config, "timeout_ms: 86400001 is not allowed (must be in 1..86400000 ms"},
      {"timeout_ms: negative", [](f_t) { (void)config::from_json(R"({"timeout_ms": -1})"); }, errc::invalid_config,
       "timeout_ms: -1 is not allowed (must be in 1..86400000 ms"},
      {"config: nested 100,000 levels deep",
       [](f_t) { (void)config::from_json(R"({"policy": )" + nested(100'000) + "}"); }, errc::invalid_config,
       "config: nested deeper than 64 levels at byte 74"},
      {"config: nested 65 levels in a value", [](f_t) { (void)config::from_json(nested(65)); }, errc::invalid_config,
       "config: nested deeper than 64 levels at byte 64"},
      {"config: a long string with control characters echoed as an excerpt",
       [](f_t) { (void)config::from_json(R"({"policy": ")" + hostile_text() + R"("})"); }, errc::invalid_config,
       R"(policy: "a\nb\x01c)"},
      {"config: a long unknown key echoed as an excerpt",
       [](f_t) { (void)config::from_json(R"({")" + hostile_text() + R"(": 1})"); }, errc::invalid_config,
       R"(a\nb\x01c)" + std::string(31, 'x') + "...: unknown field"},
      {"config: a long array echoed as an excerpt",
       [](f_t) { (void)config::from_json(R"({"window_size": [)" + repeat("1,", 100'000) + "1]}"); },
       errc::invalid_config, "window_size: [" + repeat("1,", 19) + "1... is not allowed (must be an integer)"},
      {"config: a long bad token echoed as an excerpt",
       [](f_t) { (void)config::from_json(R"({"window_size": ")" + std::string(100'000, 'x')); }, errc::invalid_config,
       "last read: '\"" + std::string(39, 'x') + "...'"},
      {"plan: nested 100,000 levels deep", [](f_t) { (void)tools::parse_plan_text(nested(100'000)); },
       errc::invalid_json, "input: nested deeper than 64 levels at byte 64"},
      {"plan: a long policy name echoed as an excerpt",
       [](f_t) {
         (void)tools::parse_plan_text(R"({"load": [[1]], "num_replicas": 1, "num_groups": 1, "num_nodes": 1,
                                          "num_ranks": 1, "policy": ")" +
                                      hostile_text() + R"("})");
       },
       errc::invalid_argument, R"(policy: unknown policy "a\nb\x01c)"},
      {"plan: a deep value echoed as an excerpt",
       [](f_t) { (void)tools::parse_plan_text(R"({"load": [[1]], "num_replicas": )" + nested(60) + "}"); },
       errc::invalid_json, "num_replicas: must be an integer, got [[[[[[[[[...]]]]]]]]]"},
      {"policy: loads near FLT_MAX whose float32 sums overflow",
       [](f_t) { (void)rebalance(policy_kind::deepseek_default, policy_input(3e38)); }, errc::invalid_argument,
       "load[0][0]: layer 0's total load reaches 3e+38 here, at or above the allowed 1e+30"},
      {"policy: a layer total that reaches the bound at a later expert",
       [](f_t) { (void)rebalance(policy_kind::min_move, policy_input(5e29)); }, errc::invalid_argument,
       "load[0][1]: layer 0's total load reaches 1e+30 here"},
      {"plan: loads near FLT_MAX",
       [](f_t) {
         (void)tools::parse_plan_text(R"({"load":[[3e38,3e38,3e38,3e38,1,1,1,1]],"num_replicas":8,"num_groups":4,
                                          "num_nodes":2,"num_ranks":2})");
       },
       errc::invalid_argument, "load[0][0]: layer 0's total load reaches 3e+38"},
      {"config struct: unknown policy", [](f_t) { (void)from_struct([](config& c) { c.policy = ""; }); },
       errc::invalid_config, R"(policy: "" is not allowed)"},

      // --- placement maps (core/placement.hpp)
      {"placement: expert id too large",
       [](f_t) {
         placement(rows({{0, 1, 2, 3, 4, 5, 6, 0}}), experts, 2);
       },
       errc::invalid_map, "phy2log[0][6]: expert id 6 is out of range (allowed -1 for an empty slot, or 0..5)"},
      {"placement: expert id below -1",
       [](f_t) {
         placement(rows({{0, 1, 2, 3, 4, 5, -2, 0}}), experts, 2);
       },
       errc::invalid_map, "phy2log[0][6]: expert id -2 is out of range"},
      {"placement: expert without a replica",
       [](f_t) {
         placement(rows({{0, 1, 2, 3, 4, 4, 4, -1}}), experts, 2);
       },
       errc::invalid_map, "phy2log[0]: logical expert 5 has no replica"},
      {"placement: ranks do not divide the slots",
       [](f_t) {
         placement(rows({{0, 1, 2, 3, 4, 5, 0, 1}}), experts, 3);
       },
       errc::invalid_map, "phy2log: 8 physical slots per layer are not divisible by 3 ranks"},
      {"placement: fewer slots than experts",
       [](f_t) {
         placement(rows({{0, 1, 2, 3}}), experts, 2);
       },
       errc::invalid_map, "phy2log: 4 physical slots cannot hold 6 logical experts"},
      {"placement: zero ranks",
       [](f_t) {
         placement(rows({{0, 1, 2, 3, 4, 5, 0, 1}}), experts, 0);
       },
       errc::invalid_map, "phy2log: number of ranks must be > 0, got 0"},
      {"placement: zero experts",
       [](f_t) {
         placement(rows({{0, 1}}), 0, 1);
       },
       errc::invalid_map, "phy2log: number of logical experts must be > 0, got 0"},
      {"placement: no layers", [](f_t) { placement(matrix<expert_id>(0, 8), experts, 1); }, errc::invalid_map,
       "phy2log: needs at least one layer"},
      {"placement: no slots", [](f_t) { placement(matrix<expert_id>(2, 0), experts, 1); }, errc::invalid_map,
       "phy2log: needs at least one physical slot per layer"},
      {"placement: error in a later layer named",
       [](f_t) {
         placement(rows({{0, 1, 2, 3, 4, 5, 0, 1}, {0, 1, 2, 3, 4, 5, 0, 9}}), experts, 2, "old_phy2log");
       },
       errc::invalid_map, "old_phy2log[1][7]: expert id 9 is out of range"},
      {"placement: ragged rows",
       [](f_t) {
         (void)placement::from_rows({{0, 1, 2, 3, 4, 5}, {0, 1, 2}}, experts, 1);
       },
       errc::invalid_map, "phy2log[1]: row has 3 entries, row 0 has 6"},
      {"placement: no rows", [](f_t) { (void)placement::from_rows({}, experts, 1); }, errc::invalid_map,
       "phy2log: needs at least one layer"},
      {"placement: id beyond int32",
       [](f_t) {
         (void)placement::from_rows({{0, 1, 2, 3, 4, 5, 4294967296LL}}, experts, 1);
       },
       errc::invalid_map, "phy2log[0][6]: expert id 4294967296 is out of range"},
      {"placement: initial with zero layers", [](f_t) { (void)placement::initial(0, experts, slots, 1); },
       errc::invalid_map, "initial placement: layers must be > 0, got 0"},
      {"placement: initial with too few slots", [](f_t) { (void)placement::initial(1, experts, 4, 2); },
       errc::invalid_map, "initial placement: 4 physical slots cannot hold 6 logical experts"},
      {"set_layer: short row",
       [](f_t f) {
         f.maps.set_layer(0, std::vector<expert_id>{0, 1, 2, 3, 4, 5, 0});
       },
       errc::invalid_map, "phy2log[0]: row has 7 entries, expected 8"},
      {"set_layer: layer out of range", [](f_t f) { f.maps.set_layer(2, moving_row); }, errc::invalid_argument,
       "set_layer: layer 2 out of range 0..1"},
      {"set_layer: negative layer", [](f_t f) { f.maps.set_layer(-1, moving_row); }, errc::invalid_argument,
       "set_layer: layer -1 out of range 0..1"},
      {"set_layer: id out of range",
       [](f_t f) {
         f.maps.set_layer(1, std::vector<expert_id>{5, 4, 3, 2, 1, 0, 6, 0});
       },
       errc::invalid_map, "phy2log[1][6]: expert id 6 is out of range"},
      {"set_layer: expert without a replica",
       [](f_t f) {
         f.maps.set_layer(1, std::vector<expert_id>{0, 0, 1, 2, 3, 4, -1, -1});
       },
       errc::invalid_map, "phy2log[1]: logical expert 5 has no replica"},
      {"moved_slots: shapes differ", [](f_t f) { (void)moved_slots(f.start, matrix<expert_id>(2, 4)); },
       errc::invalid_map, "moved_slots: shapes differ (2x8 vs 2x4)"},

      // --- model bundles (exec::model_shape::validate, through the rearranger)
      {"model: zero layers",
       [](f_t f) {
         auto s = f.shape;
         s.layers = 0;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.layers: must be > 0, got 0"},
      {"model: zero experts",
       [](f_t f) {
         auto s = f.shape;
         s.num_logical = 0;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.num_logical: must be > 0, got 0"},
      {"model: zero ranks",
       [](f_t f) {
         auto s = f.shape;
         s.num_ranks = 0;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.num_ranks: must be > 0, got 0"},
      {"model: fewer slots than experts",
       [](f_t f) {
         auto s = f.shape;
         s.num_physical = 5;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.num_physical: 5 must be >= 6 experts"},
      {"model: ranks do not divide the slots",
       [](f_t f) {
         auto s = f.shape;
         s.num_ranks = 3;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.num_physical: 8 must be >= 6 experts and divisible by 3 ranks"},
      {"model: negative ranks_per_node",
       [](f_t f) {
         auto s = f.shape;
         s.ranks_per_node = -1;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.ranks_per_node: must be >= 0, got -1"},
      {"model: empty bundle",
       [](f_t f) {
         auto s = f.shape;
         s.bundle.clear();
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.bundle: needs at least one tensor"},
      {"model: tensor of zero bytes",
       [](f_t f) {
         auto s = f.shape;
         s.bundle[1].bytes_per_expert = 0;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.bundle[1] (t1): bytes_per_expert must be > 0"},
      {"model: stride smaller than the tensor",
       [](f_t f) {
         auto s = f.shape;
         s.bundle[0].stride = 8;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "model.bundle[0] (t0): stride 8 is smaller than bytes_per_expert 64"},
      {"model: rank count differs from the communicator's",
       [](f_t f) {
         auto s = f.shape;
         s.num_ranks = 2;
         exec::rearranger(s, 0, *f.dev, *f.stream, *f.c);
       },
       errc::invalid_argument, "rearranger: communicator is rank 0 of 1, model says rank 0 of 2"},
      {"model: rank differs from the communicator's",
       [](f_t f) { exec::rearranger(f.shape, 1, *f.dev, *f.stream, *f.c); }, errc::invalid_argument,
       "rearranger: communicator is rank 0 of 1, model says rank 1 of 1"},
      {"model: staging cap below one bundle",
       [](f_t f) { exec::rearranger(f.shape, 0, *f.dev, *f.stream, *f.c, {.staging_bytes = 87}); },
       errc::invalid_argument, "staging_bytes: 87 is smaller than one expert bundle (88 bytes)"},

      // --- rearrangement with maps, rows and weights that do not fit the model
      {"rearrange_layer: layer out of range",
       [](f_t f) { (void)f.re.rearrange_layer(2, f.weights(), f.maps, moving_row); }, errc::invalid_argument,
       "rearrange_layer: layer 2 out of range 0..1"},
      {"rearrange_layer: negative layer",
       [](f_t f) { (void)f.re.rearrange_layer(-1, f.weights(), f.maps, moving_row); }, errc::invalid_argument,
       "rearrange_layer: layer -1 out of range 0..1"},
      {"rearrange_layer: new row too short",
       [](f_t f) {
         (void)f.re.rearrange_layer(0, f.weights(), f.maps, std::vector<expert_id>{5, 4, 3, 2, 1, 0, 5});
       },
       errc::invalid_map, "new phy2log[0]: has 7 slots, expected 8"},
      {"rearrange_layer: new row too long",
       [](f_t f) {
         (void)f.re.rearrange_layer(0, f.weights(), f.maps, std::vector<expert_id>{5, 4, 3, 2, 1, 0, 5, 4, 3});
       },
       errc::invalid_map, "new phy2log[0]: has 9 slots, expected 8"},
      {"rearrange_layer: expert id out of range",
       [](f_t f) {
         (void)f.re.rearrange_layer(1, f.weights(), f.maps, std::vector<expert_id>{5, 4, 3, 2, 1, 0, 5, 6});
       },
       errc::invalid_map, "new phy2log[1][7]: expert id 6 is out of range"},
      {"rearrange_layer: expert without a replica",
       [](f_t f) {
         (void)f.re.rearrange_layer(0, f.weights(), f.maps, std::vector<expert_id>{4, 4, 3, 2, 1, 0, -1, 4});
       },
       errc::invalid_map, "new phy2log[0]: logical expert 5 has no replica"},
      {"rearrange_layer: maps with more slots than the model",
       [](f_t f) {
         auto other = placement::initial(layers, experts, 2 * slots, 1);
         (void)f.re.rearrange_layer(0, f.weights(), other, moving_row);
       },
       errc::invalid_argument, "rearrange_layer: maps are 2 layers of 16 slots over 1 ranks, the model 2 of 8 over 1"},
      {"rearrange_layer: maps with fewer layers than the model",
       [](f_t f) {
         auto other = placement::initial(1, experts, slots, 1);
         (void)f.re.rearrange_layer(1, f.weights(), other, moving_row);
       },
       errc::invalid_argument, "rearrange_layer: maps are 1 layers of 8 slots over 1 ranks, the model 2 of 8 over 1"},
      {"rearrange_layer: maps with fewer experts than the model",
       [](f_t f) {
         auto other = placement::initial(layers, experts - 1, slots, 1);
         (void)f.re.rearrange_layer(0, f.weights(), other, moving_row);
       },
       errc::invalid_argument, "rearrange_layer: maps have 5 logical experts, the model 6"},
      {"rearrange_layer: maps with more experts than the model",
       [](f_t f) {
         auto other = placement::initial(layers, experts + 1, slots, 1);
         (void)f.re.rearrange_layer(0, f.weights(), other, moving_row);
       },
       errc::invalid_argument, "rearrange_layer: maps have 7 logical experts, the model 6"},
      {"rearrange_layer: weights for fewer layers",
       [](f_t f) {
         auto w = f.weights();
         w.base.pop_back();
         (void)f.re.rearrange_layer(0, w, f.maps, moving_row);
       },
       errc::invalid_argument, "rearrange_layer: weights describe 1 layers, the model 2 layers of 2 tensors"},
      {"rearrange_layer: weights for fewer tensors",
       [](f_t f) {
         auto w = f.weights();
         w.base[0].pop_back();
         (void)f.re.rearrange_layer(0, w, f.maps, moving_row);
       },
       errc::invalid_argument, "rearrange_layer: weights describe 2 layers, the model 2 layers of 2 tensors"},
      {"rearrange_layer: a null weight pointer",
       [](f_t f) {
         auto w = f.weights();
         w.base[0][1] = nullptr;
         (void)f.re.rearrange_layer(0, w, f.maps, moving_row);
       },
       errc::invalid_argument, "rearrange_layer: weights[0][1] (t1) is null"},
      {"rearrange: new map with more layers",
       [](f_t f) {
         (void)f.re.rearrange(f.weights(), f.maps, rows({moving_row, moving_row, moving_row}));
       },
       errc::invalid_map, "new phy2log: has 3 layers, the model 2"},
      {"rearrange: new map with fewer slots",
       [](f_t f) { (void)f.re.rearrange(f.weights(), f.maps, matrix<expert_id>(2, 7, 0)); }, errc::invalid_map,
       "new phy2log[0]: has 7 slots, expected 8"},
      {"rearrange: later layer invalid, earlier layer would move",
       [](f_t f) {
         (void)f.re.rearrange(f.weights(), f.maps, rows({moving_row, {0, 1, 2, 3, 4, 4, 4, 4}}));
       },
       errc::invalid_map, "new phy2log[1]: logical expert 5 has no replica"},

      // --- communicators: backend names, setups, peers
      {"backend name: unknown", [](f_t) { (void)comm::parse_backend("mpi"); }, errc::invalid_argument,
       "communicator: unknown backend \"mpi\" (allowed: loopback, gloo, nccl, stateless_nccl, cuda_ipc)"},
      {"backend name: empty", [](f_t) { (void)comm::parse_backend(""); }, errc::invalid_argument,
       "communicator: unknown backend \"\""},
      {"backend name: wrong case", [](f_t) { (void)comm::parse_backend("NCCL"); }, errc::invalid_argument,
       "communicator: unknown backend \"NCCL\""},
      {"device name: unknown", [](f_t) { (void)device::parse_backend_kind("tpu"); }, errc::invalid_argument, "tpu"},
      {"loopback: no world", [](f_t) { (void)comm::make_communicator(comm::backend::loopback, {}); },
       errc::invalid_argument, "loopback communicator: setup.world is missing"},
      {"loopback: world of another size",
       [](f_t f) { (void)comm::make_communicator(comm::backend::loopback, {.rank = 0, .size = 2, .world = f.world}); },
       errc::invalid_argument, "loopback communicator: world has 1 ranks, setup.size is 2"},
      {"loopback: rank out of range",
       [](f_t f) { (void)comm::make_communicator(comm::backend::loopback, {.rank = 1, .size = 1, .world = f.world}); },
       errc::invalid_argument, "communicator: rank 1 out of range 0..0"},
      {"loopback: world of zero ranks", [](f_t) { (void)comm::make_loopback_world(0); }, errc::invalid_argument,
       "loopback world: size must be > 0, got 0"},
      {"loopback: send to oneself",
       [](f_t f) {
         f.c->add_send({f.weights().base[0][0], 64}, 0);
       },
       errc::invalid_argument, "add_send: rank 0 cannot exchange with itself"},
      {"loopback: receive from oneself",
       [](f_t f) {
         f.c->add_recv({f.weights().base[0][0], 64}, 0);
       },
       errc::invalid_argument, "add_recv: rank 0 cannot exchange with itself"},
      {"loopback: send to a rank out of range",
       [](f_t f) {
         f.c->add_send({f.weights().base[0][0], 64}, 1);
       },
       errc::invalid_argument, "add_send: peer 1 is out of range for 1 ranks (rank 0)"},
      {"loopback: receive from a negative rank",
       [](f_t f) {
         f.c->add_recv({f.weights().base[0][0], 64}, -1);
       },
       errc::invalid_argument, "add_recv: peer -1 is out of range for 1 ranks (rank 0)"},
      {"bundles that differ between ranks", [](f_t) { bundles_differ_between_ranks(); }, errc::invalid_argument,
       "which sent"},

      // --- EplbState parameters (live weights given, never touched by a failed construction)
      {"state: rank out of range",
       [](f_t f) {
         auto p = f.params();
         p.rank = 1;
         make_state(std::move(p));
       },
       errc::invalid_argument, "eplb_state: rank 1 is out of range for 1 ranks"},
      {"state: no store",
       [](f_t f) {
         auto p = f.params();
         p.store = nullptr;
         make_state(std::move(p));
       },
       errc::invalid_argument, "eplb_state: store is required"},
      {"state: redundant experts differ from the model",
       [](f_t f) {
         auto p = f.params();
         p.cfg.num_redundant_experts = 3;
         make_state(std::move(p));
       },
       errc::invalid_config, "num_redundant_experts: 3 does not match the model (8 slots for 6 experts)"},
      {"state: weights for fewer layers",
       [](f_t f) {
         auto p = f.params();
         p.weights.base.pop_back();
         make_state(std::move(p));
       },
       errc::invalid_argument, "eplb_state: weights describe 1 layers, the model has 2"},
      {"state: a null weight pointer",
       [](f_t f) {
         auto p = f.params();
         p.weights.base[1][0] = nullptr;
         make_state(std::move(p));
       },
       errc::invalid_argument, "eplb_state: weights[1][0] (t0) is null"},
      // The engine's own buffers (issue 18): 2 layers x 8 slots, 6 experts, 3 replicas at most.
      {"state: engine load buffer null",
       [](f_t f) {
         auto p = f.params();
         p.buffers.load = engine_buffer{nullptr, element_type::int32};
         make_state(std::move(p));
       },
       errc::invalid_argument, "buffers.load: the pointer is null"},
      {"state: engine int64 map not aligned to 8 bytes",
       [](f_t f) {
         alignas(8) static std::byte memory[512];
         auto p = f.params();
         p.buffers.phy2log = engine_buffer{memory + 4, element_type::int64};
         make_state(std::move(p));
       },
       errc::invalid_argument, "buffers.phy2log: not aligned to its 8-byte int64 elements (address 0x"},
      {"state: engine buffer of an unknown element type",
       [](f_t f) {
         alignas(8) static std::byte memory[512];
         auto p = f.params();
         p.buffers.replica_count = engine_buffer{memory, static_cast<element_type>(7)};
         make_state(std::move(p));
       },
       errc::invalid_argument, "buffers.replica_count: element type 7 is neither int32 nor int64"},
      {"state: engine maps overlapping",
       [](f_t f) {
         alignas(8) static std::byte memory[512];
         auto p = f.params();
         p.buffers.phy2log = engine_buffer{memory, element_type::int32};  // 64 bytes
         p.buffers.log2phy = engine_buffer{memory + 32, element_type::int32};
         make_state(std::move(p));
       },
       errc::invalid_argument, "buffers.log2phy: overlaps buffers.phy2log"},
      {"state: invalid initial map",
       [](f_t f) {
         auto p = f.params();
         p.initial_phy2log = rows({moving_row, {0, 1, 2, 3, 4, 5, 0, 7}});
         make_state(std::move(p));
       },
       errc::invalid_map, "initial_phy2log[1][7]: expert id 7 is out of range"},
      {"state: zero expert groups",
       [](f_t f) {
         auto p = f.params();
         p.model.num_groups = 0;
         make_state(std::move(p));
       },
       errc::invalid_argument, "eplb_state: model: num_groups: must be > 0, got 0"},
      {"state: groups that do not divide the experts",
       [](f_t f) {
         auto p = f.params();
         p.model.num_groups = 4;
         make_state(std::move(p));
       },
       errc::invalid_argument, "eplb_state: model: num_groups: 4 does not divide the 6 logical experts"},
      {"state: zero nodes",
       [](f_t f) {
         auto p = f.params();
         p.model.num_nodes = 0;
         make_state(std::move(p));
       },
       errc::invalid_argument, "eplb_state: model: num_nodes: must be > 0, got 0"},
      {"state: cuda_ipc for a model on two nodes",
       [](f_t f) {
         auto p = f.params();
         p.cfg.communicator = "cuda_ipc";
         p.model.num_nodes = 2;
         make_state(std::move(p));
       },
       errc::invalid_config,
       "communicator: cuda_ipc connects the GPUs of one node, the model spans 2 nodes (use gloo or nccl)"},
      {"state: config names another communicator than the one given",
       [](f_t f) {
         auto p = f.params();
         p.cfg.communicator = "gloo";
         p.comm = comm::make_communicator(comm::backend::loopback, {.rank = 0, .size = 1, .world = f.world});
         make_state(std::move(p));
       },
       errc::invalid_config, "communicator: config says \"gloo\", the communicator given is loopback"},
      {"state: async staging cap below one layer",
       [](f_t f) {
         auto p = f.params();
         p.cfg.use_async = true;
         p.cfg.staging_bytes = 100;
         make_state(std::move(p));
       },
       errc::invalid_config,
       "staging_bytes: 100 is not allowed in async mode (one layer of this rank needs 704 bytes)"},
      {"state: registered staging with a cap below one layer",
       [](f_t f) {
         auto p = f.params();
         p.cfg.register_buffers = true;
         p.cfg.staging_bytes = 100;
         make_state(std::move(p));
       },
       errc::invalid_config,
       "register_buffers: true is not allowed with staging_bytes = 100 (registered transfers need one layer of this "
       "rank in one piece: 704 bytes)"},
      {"state: comm_wrap beside comm_factory",
       [](f_t f) {
         auto p = f.params();
         p.comm_wrap = [](std::unique_ptr<comm::communicator> c, int) { return c; };
         p.comm_factory = [w = f.world](int) {
           return comm::make_communicator(comm::backend::loopback, {.rank = 0, .size = 1, .world = w});
         };
         make_state(std::move(p));
       },
       errc::invalid_argument,
       "eplb_state: comm_wrap wraps the communicators eplb makes itself; with comm_factory it would never be used"},
  };

  // Backends that depend on the build and the machine.
  for (const auto& b : comm::backend_report()) {
    if (b.kind == comm::backend::gloo) {
      const bool built = b.built;
      t.push_back({"gloo: no rendezvous store",
                   [](f_t f) {
                     (void)comm::make_communicator(comm::backend::gloo, {.rank = 0, .size = 1, .dev = f.dev.get()});
                   },
                   built ? errc::invalid_argument : errc::backend_unavailable,
                   built ? "gloo communicator: setup.rendezvous (a store) is missing" : "built without Gloo"});
      // A gloo communicator with one bad option: its error where Gloo was built, else unavailable.
      const auto bad_option = [&](const char* name, comm::options opts, const char* text) {
        t.push_back(
            {name,
             [opts](f_t f) {
               (void)comm::make_communicator(
                   comm::backend::gloo,
                   {.rank = 0, .size = 1, .rendezvous = comm::make_memory_store(), .dev = f.dev.get(), .opts = opts});
             },
             built ? errc::invalid_argument : errc::backend_unavailable, built ? text : "built without Gloo"});
      };
      bad_option("gloo: too many lanes", {.lanes = 65}, "gloo: lanes must be in 0..64 (0 = automatic), got 65");
      bad_option("gloo: nice out of range", {.nice = 20}, "gloo: nice must be in 0..19, got 20");
      bad_option("gloo: zero staging bytes", {.staging_bytes = 0}, "gloo: staging_bytes must be > 0");
      bad_option("gloo: zero chunk size", {.chunk_bytes = 0}, "gloo: chunk_bytes must be > 0");
      t.push_back({"gloo: unknown transport", [](f_t) { (void)comm::parse_gloo_transport("rdma"); },
                   errc::invalid_argument, R"(gloo: unknown transport "rdma" (allowed: auto, tcp, shared_memory))"});
      // Two ranks as threads choosing the transport: rank 1 runs beside this one and must fail alike.
      const auto two_ranks = [&](const char* name, comm::gloo_transport rank0, comm::gloo_transport rank1, errc code,
                                 const char* text) {
        t.push_back({name,
                     [rank0, rank1](f_t f) {
                       auto store = comm::make_memory_store();
                       const auto make = [&](int rank, comm::gloo_transport via) {
                         (void)comm::make_communicator(comm::backend::gloo, {.rank = rank,
                                                                             .size = 2,
                                                                             .rendezvous = store,
                                                                             .dev = f.dev.get(),
                                                                             .opts = {.timeout = 5s, .gloo_via = via}});
                       };
                       auto other = std::async(std::launch::async, [&] {
                         try {
                           make(1, rank1);
                         } catch (const error&) {  // NOLINT(bugprone-empty-catch): rank 0 reports the same
                         }
                       });
                       try {
                         make(0, rank0);
                       } catch (...) {
                         other.wait();
                         throw;
                       }
                       other.wait();
                     },
                     built ? code : errc::backend_unavailable, built ? text : "built without Gloo"});
      };
      two_ranks("gloo: shared memory between threads of a host device", comm::gloo_transport::shared_memory,
                comm::gloo_transport::automatic, errc::invalid_config,
                "gloo: the shared_memory transport needs every rank on one host, one process each, with a CUDA "
                "device: rank 0 has no CUDA device");
      two_ranks("gloo: ranks ask for different transports", comm::gloo_transport::tcp,
                comm::gloo_transport::shared_memory, errc::invalid_argument,
                "gloo: rank 0 asks for the tcp transport, rank 1 for shared_memory");
    } else if (b.kind != comm::backend::loopback && !b.runnable) {
      // nccl, stateless_nccl and cuda_ipc where they cannot run (not built, or no GPU here).
      const auto kind = b.kind;
      t.push_back({fmt::format("{}: unavailable here", comm::to_string(kind)),
                   [kind](f_t f) { (void)comm::make_communicator(kind, {.rank = 0, .size = 1, .dev = f.dev.get()}); },
                   errc::backend_unavailable, fmt::format("communicator {}: ", comm::to_string(kind))});
    }
  }
  t.push_back({"tcp store server: not an address", [](f_t) { comm::tcp_store_server("not-an-address", 0); },
               errc::transport, "tcp store server: cannot listen on not-an-address:0"});
  t.push_back({"tcp store: nobody listening", [](f_t) { (void)comm::make_tcp_store("127.0.0.1", 1, 200ms); },
               errc::timeout, "tcp store: cannot connect to 127.0.0.1:1"});
  t.push_back({"memory store: add to a key that is not a counter",
               [](f_t) {
                 auto st = comm::make_memory_store();
                 st->set("k", "abc");
                 (void)st->add("k", 1);
               },
               errc::invalid_argument, "store: key \"k\" holds \"abc\", not an integer counter"});
  t.push_back({"tcp store: add to a key that is not a counter",
               [](f_t) {
                 comm::tcp_store_server server("127.0.0.1", 0);
                 auto st = comm::make_tcp_store("127.0.0.1", server.port(), 2s);
                 st->set("k", "abc");
                 (void)st->add("k", 1);
               },
               errc::transport, "(key \"k\")"});
  add_reserve_rows(t);
  return t;
}

}  // namespace

TEST_CASE("bad inputs: a clear error with the right code, and nothing changed") {
  const auto cases = table();
  MESSAGE(cases.size(), " bad inputs");
  CHECK(cases.size() >= 100);
  for (const auto& row : cases) {
    CAPTURE(row.name);
    fixture f;
    const auto before = f.observe();
    CHECK_EPLB_ERROR(row.action(f), row.code, row.text);
    const auto after = f.observe();
    CHECK_MESSAGE(after.phy2log == before.phy2log, row.name, ": phy2log changed");
    CHECK_MESSAGE(after.replica_counts == before.replica_counts, row.name, ": replica counts changed");
    CHECK_MESSAGE(after.log2phy == before.log2phy, row.name, ": log2phy changed");
    CHECK_MESSAGE(after.storage == before.storage, row.name, ": live weight bytes changed");
    CHECK_MESSAGE(after.pending == before.pending, row.name, ": operations left queued on the communicator");
    // The fixture still works after the error: a valid rearrangement moves and verifies every byte.
    CHECK_NOTHROW(f.re.rearrange(f.weights(), f.maps, rows({moving_row, moving_row})));
    CHECK(f.maps.phy2log(0)[0] == 5);
  }
}

// Issue 15: an error that echoes a hostile value stays one short line, whatever the value.
TEST_CASE("errors echo hostile values as short excerpts without control characters") {
  const std::string plan_head =
      R"({"load": [[1]], "num_replicas": 1, "num_groups": 1, "num_nodes": 1, "num_ranks": 1, )";
  const std::vector<std::function<void()>> inputs = {
      [] { (void)config::from_json(R"({"policy": ")" + hostile_text() + R"("})"); },
      [] { (void)config::from_json(R"({"communicator": ")" + hostile_text() + R"("})"); },
      [] { (void)config::from_json(R"({")" + hostile_text() + R"(": true})"); },
      [] { (void)config::from_json(R"({"use_async": [")" + hostile_text() + R"("]})"); },
      [] { (void)config::from_json(R"({"window_size": ")" + hostile_text()); },
      [] { (void)config::from_json(nested(100'000)); },
      [&] { (void)tools::parse_plan_text(plan_head + R"("policy": ")" + hostile_text() + R"("})"); },
      [&] { (void)tools::parse_plan_text(plan_head + R"(")" + hostile_text() + R"(": 1})"); },
      [&] { (void)tools::parse_plan_text(plan_head + R"("policy": )" + nested(64) + "}"); },
      [] { (void)tools::parse_plan_text(R"({"load": [[")" + hostile_text() + R"("]]})"); },
      [] {
        (void)tools::parse_plan_text(R"({"load": [[1]], "num_ranks": )" + repeat("[1,", 60) + "1" + repeat("]", 60) +
                                     "}");
      },
      [] { (void)tools::parse_plan_text(std::string(100'000, '9') + "e99999"); },
  };
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    CAPTURE(i);
    std::string message;
    try {
      inputs[i]();
    } catch (const error& e) {
      message = e.what();
    }
    CAPTURE(message);
    CHECK(!message.empty());
    CHECK(message.size() < 500);
    CHECK(std::none_of(message.begin(), message.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; }));
  }
}

TEST_CASE("deadline_after saturates instead of overflowing") {
  using clock = std::chrono::steady_clock;
  CHECK(deadline_after(std::chrono::milliseconds::max()) == clock::time_point::max());
  CHECK(deadline_after(std::chrono::milliseconds(std::chrono::hours(24 * 365 * 1000))) == clock::time_point::max());
  const auto before = clock::now();
  const auto day = deadline_after(max_timeout);
  CHECK(day >= before + std::chrono::hours(24));
  CHECK(day <= clock::now() + std::chrono::hours(24));
  const auto zero = deadline_after(0ms);
  const auto negative = deadline_after(std::chrono::milliseconds::min());
  CHECK(zero <= clock::now());
  CHECK(negative <= clock::now());
}

// Issue 15 F: the merged report of `eplb simulate` tells what the ranks said, all of it.
TEST_CASE("merged simulate reports are truthful") {
  using nlohmann::json;
  tools::simulate_config cfg;
  cfg.ranks = 2;
  const json commits = json::array({json::array({0, 0, 50})});
  const auto rank = [&](int r, bool verified, json errors, json rank_commits) {
    return json{{"rank", r},
                {"verified", verified},
                {"failure", ""},
                {"errors", std::move(errors)},
                {"commits", rank_commits},
                {"rebalances", json::array()},
                {"busy_us", {1.0}},
                {"idle_us", {1.0}}};
  };
  SUBCASE("errors a run went on after are listed") {
    const json err =
        json::array({{{"step", 151}, {"error", "[transport] layer 1: injected transfer fault on rank 1"}}});
    const auto out = tools::merge_reports(cfg, {rank(0, true, json::array(), commits), rank(1, true, err, commits)});
    CHECK(out["verified"] == true);
    CHECK(out["errors"] == 1);
    REQUIRE(out["failures"].size() == 1);
    CHECK(out["failures"][0]["rank"] == 1);
    CHECK(out["failures"][0]["step"] == 151);
    CHECK(out["failures"][0]["error"].get<std::string>().find("injected transfer fault") != std::string::npos);
    CHECK(tools::summary_table(cfg, out).find("rank 1 step 151: [transport] layer 1: injected transfer fault") !=
          std::string::npos);
  }
  SUBCASE("commits in different steps are a failure, even when every rank verified") {
    const json other = json::array({json::array({0, 0, 51})});
    const auto out =
        tools::merge_reports(cfg, {rank(0, true, json::array(), commits), rank(1, true, json::array(), other)});
    CHECK(out["commit_steps_consistent"] == false);
    REQUIRE(out.contains("failure"));
    CHECK(out["failure"].get<std::string>().find("rank 1 committed layers in other steps") != std::string::npos);
  }
  SUBCASE("a rank that is not verified makes the run unverified") {
    auto bad = rank(1, false, json::array(), commits);
    bad["failure"] = "rank 1: [verification_failed] layer 0 slot 1 tensor 0 does not hold expert 3's bytes";
    const auto out = tools::merge_reports(cfg, {rank(0, true, json::array(), commits), bad});
    CHECK(out["verified"] == false);
    CHECK(out["failure"] == bad["failure"]);
    CHECK(out["failures"].size() == 1);
  }
  SUBCASE("a rank that died on purpose does not count against verified; survivors do") {
    json died = {{"rank", 1}, {"verified", false}, {"failure", "rank 1: died at step 120 (injected)"}, {"died", true}};
    auto survivor = rank(0, false, json::array(), commits);
    survivor["failure"] = "rank 0: [timeout] rank 1 did not join";
    survivor["weights_intact"] = true;
    const auto out = tools::merge_reports(cfg, {survivor, died});
    CHECK(out["verified"] == true);
    CHECK(out["failure"] == survivor["failure"]);
    CHECK(out["failures"].size() == 2);
  }
}

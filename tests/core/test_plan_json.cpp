#include <doctest/doctest.h>

#include "check_error.hpp"
#include "eplb/core/load.hpp"
#include "tools/plan_json.hpp"

using namespace eplb;
using eplb::tools::parse_plan_text;

namespace {
const char* readme_example = R"({
  "load": [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]],
  "num_replicas": 16, "num_groups": 4, "num_nodes": 2, "num_ranks": 8})";
}

TEST_CASE("plan request round trip") {
  const auto req = parse_plan_text(std::string_view(readme_example));
  const auto res = tools::run_plan(req);
  const auto out = tools::to_json(res);
  CHECK(out["phy2log"][0] == nlohmann::json({5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1}));
  CHECK(out["log2phy"][0][1] == nlohmann::json({13, 15}));
  CHECK(out["log2phy"][0][0] == nlohmann::json({12, -1}));
  CHECK(out["replica_count"][1][6] == 2);
  CHECK(out["balancedness"]["before"].is_null());
  const auto trivial = placement::initial(2, 12, 16, 8);
  CHECK(out["balancedness"]["after"].get<double>() == doctest::Approx(balancedness(res.after, req.load)));
  CHECK(out["balancedness"]["after"].get<double>() > balancedness(trivial, req.load));
  CHECK(out["moved_experts"] == 0);
  const auto text = tools::to_text(req, res);
  CHECK(text.find("rank   7") != std::string::npos);
}

TEST_CASE("plan with an old placement reports before/after and moves") {
  const auto req = parse_plan_text(std::string_view(R"({
    "load": [[10, 0, 0, 0]], "num_replicas": 4, "num_groups": 1, "num_nodes": 1, "num_ranks": 2,
    "old_phy2log": [[0, 1, 2, 3]], "policy": "default"})"));
  const auto res = tools::run_plan(req);
  REQUIRE(res.balancedness_before.has_value());
  CHECK(*res.balancedness_before == doctest::Approx(0.5));
  CHECK(res.moved_experts == moved_slots(req.old->phy2log(), res.after.phy2log()));
}

TEST_CASE("plan request errors name the field and the rule") {
  struct bad_case {
    const char* json;
    errc code;
    const char* text;
  };
  const bad_case cases[] = {
      {"{", errc::invalid_json, "input: not valid JSON"},
      {"3e133333", errc::invalid_json, "input: not valid JSON"},  // out of range (found by fuzzing)
      {"[]", errc::invalid_json, "input: must be a JSON object"},
      {R"({"num_replicas": 4})", errc::invalid_json, "load: missing"},
      {R"({"load": [[1,2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1})", errc::invalid_json,
       "num_ranks: missing"},
      {R"({"load": [[1,2],[1]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1})",
       errc::invalid_json, "load[1]: row has 1 entries, row 0 has 2"},
      {R"({"load": [[1,-2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1})",
       errc::invalid_argument, "load[0][1]: must be a finite number >= 0, got -2"},
      {R"({"load": [[1,"x"]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1})", errc::invalid_json,
       "load[0][1]: must be a number"},
      {R"({"load": [], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1})", errc::invalid_json,
       "load: must be a non-empty array"},
      {R"({"load": [[1,2]], "num_replicas": 2.5, "num_groups": 1, "num_nodes": 1, "num_ranks": 1})", errc::invalid_json,
       "num_replicas: must be an integer, got 2.5"},
      {R"({"load": [[1,2]], "num_replicas": 0, "num_groups": 1, "num_nodes": 1, "num_ranks": 1})",
       errc::invalid_argument, "num_replicas: must be in 1..1000000, got 0"},
      {R"({"load": [[1,2]], "num_replicas": 3, "num_groups": 1, "num_nodes": 1, "num_ranks": 2})",
       errc::invalid_argument, "num_replicas: 3 is not divisible by num_ranks 2"},
      {R"({"load": [[1,2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1, "polcy": "x"})",
       errc::invalid_json, "polcy: unknown field"},
      {R"({"load": [[1,2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1, "policy": "x"})",
       errc::invalid_argument, "policy: unknown policy \"x\""},
      {R"({"load": [[1,2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1,
           "old_phy2log": [[0, 0]]})",
       errc::invalid_map, "old_phy2log[0]: logical expert 1 has no replica"},
      {R"({"load": [[1,2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1,
           "old_phy2log": [[0, 1, 1]]})",
       errc::invalid_argument, "old_phy2log: rows have 3 slots, num_replicas is 2"},
      {R"({"load": [[1,2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1,
           "old_phy2log": [[0, 1], [1, 0]]})",
       errc::invalid_argument, "old_phy2log: has 2 layers, load has 1"},
      {R"({"load": [[1,2]], "num_replicas": 2, "num_groups": 1, "num_nodes": 1, "num_ranks": 1,
           "old_phy2log": [[0, 1.5]]})",
       errc::invalid_json, "old_phy2log[0][1]: must be an integer"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.json);
    CHECK_EPLB_ERROR(parse_plan_text(std::string_view(c.json)), c.code, c.text);
  }
}

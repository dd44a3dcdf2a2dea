#include "tools/plan_json.hpp"

#include <fmt/format.h>

#include <cmath>

#include "eplb/core/load.hpp"
#include "util/fail.hpp"
#include "util/json_text.hpp"

namespace eplb::tools {
namespace {

using nlohmann::json;

int get_int(const json& doc, const char* field, bool required, int fallback = 0) {
  const auto it = doc.find(field);
  if (it == doc.end()) {
    if (required) fail(errc::invalid_json, "{}: missing (an integer is required)", field);
    return fallback;
  }
  if (!it->is_number_integer()) fail(errc::invalid_json, "{}: must be an integer, got {}", field, json_excerpt(*it));
  const auto v = it->get<std::int64_t>();
  if (v <= 0 || v > 1'000'000) fail(errc::invalid_argument, "{}: must be in 1..1000000, got {}", field, v);
  return static_cast<int>(v);
}

const json& get_rows(const json& doc, const char* field) {
  const auto& rows = doc.at(field);
  if (!rows.is_array() || rows.empty()) fail(errc::invalid_json, "{}: must be a non-empty array of arrays", field);
  for (std::size_t l = 0; l < rows.size(); ++l) {
    if (!rows[l].is_array())
      fail(errc::invalid_json, "{}[{}]: must be an array, got {}", field, l, json_excerpt(rows[l]));
    if (rows[l].size() != rows[0].size()) {
      fail(errc::invalid_json, "{}[{}]: row has {} entries, row 0 has {} (rows must all be the same length)", field, l,
           rows[l].size(), rows[0].size());
    }
  }
  if (rows[0].empty()) fail(errc::invalid_json, "{}[0]: rows must not be empty", field);
  return rows;
}

// Every field of the request is one parse_plan_request knows: a misspelt optional field would
// otherwise be ignored silently.
void check_known_fields(const json& doc) {
  static constexpr const char* known[] = {"load",      "num_replicas", "num_groups", "num_nodes",
                                          "num_ranks", "old_phy2log",  "policy"};
  for (const auto& item : doc.items()) {
    const std::string key = item.key();  // a named copy: lambdas below capture it
    if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return key == k; }) == std::end(known)) {
      fail(errc::invalid_json,
           "{}: unknown field (known: load, num_replicas, num_groups, num_nodes, num_ranks, old_phy2log, policy)",
           excerpt(key));
    }
  }
}

// "load": layers x logical experts, finite numbers >= 0.
matrix<double> parse_load(const json& doc) {
  if (!doc.contains("load")) fail(errc::invalid_json, "load: missing (layers x logical experts array is required)");
  const auto& load = get_rows(doc, "load");
  matrix<double> out(load.size(), load[0].size());
  for (std::size_t l = 0; l < load.size(); ++l) {
    for (std::size_t e = 0; e < load[l].size(); ++e) {
      const auto& v = load[l][e];
      if (!v.is_number()) fail(errc::invalid_json, "load[{}][{}]: must be a number, got {}", l, e, json_excerpt(v));
      const double x = v.get<double>();
      if (!std::isfinite(x) || x < 0.0) {
        fail(errc::invalid_argument, "load[{}][{}]: must be a finite number >= 0, got {}", l, e, json_excerpt(v));
      }
      out(l, e) = x;
    }
  }
  return out;
}

// "policy", when given: "default" or "min_move".
void parse_policy_field(const json& doc, plan_request& req) {
  const auto it = doc.find("policy");
  if (it == doc.end()) return;
  if (!it->is_string()) fail(errc::invalid_json, "policy: must be a string, got {}", json_excerpt(*it));
  const auto& name = it->get_ref<const std::string&>();
  // parse_policy echoes the name whole; a hostile one is shown as an excerpt.
  if (name != "default" && name != "min_move") {
    fail(errc::invalid_argument, "policy: unknown policy \"{}\" (allowed: \"default\", \"min_move\")", excerpt(name));
  }
  req.policy = parse_policy(name);
}

// "old_phy2log", when given: the current placement, one row of num_replicas slots per load layer.
void parse_old_placement(const json& doc, plan_request& req) {
  if (!doc.contains("old_phy2log")) return;
  const auto& old = get_rows(doc, "old_phy2log");
  if (old.size() != req.load.rows()) {
    fail(errc::invalid_argument, "old_phy2log: has {} layers, load has {}", old.size(), req.load.rows());
  }
  if (old[0].size() != static_cast<std::size_t>(req.num_replicas)) {
    fail(errc::invalid_argument, "old_phy2log: rows have {} slots, num_replicas is {}", old[0].size(),
         req.num_replicas);
  }
  std::vector<std::vector<std::int64_t>> rows(old.size());
  for (std::size_t l = 0; l < old.size(); ++l) {
    for (std::size_t p = 0; p < old[l].size(); ++p) {
      if (!old[l][p].is_number_integer()) {
        fail(errc::invalid_json, "old_phy2log[{}][{}]: must be an integer, got {}", l, p, json_excerpt(old[l][p]));
      }
      rows[l].push_back(old[l][p].get<std::int64_t>());
    }
  }
  req.old = placement::from_rows(rows, static_cast<int>(req.load.cols()), req.num_ranks, "old_phy2log");
}

}  // namespace

plan_request parse_plan_request(const json& doc) {
  if (!doc.is_object()) fail(errc::invalid_json, "input: must be a JSON object, got {}", doc.type_name());
  check_known_fields(doc);
  plan_request req;
  req.load = parse_load(doc);
  req.num_replicas = get_int(doc, "num_replicas", true);
  req.num_groups = get_int(doc, "num_groups", true);
  req.num_nodes = get_int(doc, "num_nodes", true);
  req.num_ranks = get_int(doc, "num_ranks", true);
  parse_policy_field(doc, req);
  parse_old_placement(doc, req);
  validate(rebalance_input{req.load, req.num_replicas, req.num_groups, req.num_nodes, req.num_ranks,
                           req.old ? &req.old->phy2log() : nullptr});
  return req;
}

plan_request parse_plan_text(std::string_view text) {
  return parse_plan_request(parse_json(text, errc::invalid_json, "input"));
}

plan_result run_plan(const plan_request& req) {
  auto phy2log = rebalance(req.policy, rebalance_input{req.load, req.num_replicas, req.num_groups, req.num_nodes,
                                                       req.num_ranks, req.old ? &req.old->phy2log() : nullptr});
  plan_result out{placement(std::move(phy2log), static_cast<int>(req.load.cols()), req.num_ranks), std::nullopt, 0.0,
                  0};
  out.balancedness_after = balancedness(out.after, req.load);
  if (req.old) {
    out.balancedness_before = balancedness(*req.old, req.load);
    out.moved_experts = moved_slots(req.old->phy2log(), out.after.phy2log());
  }
  return out;
}

json to_json(const plan_result& r) {
  const auto& p = r.after;
  json phy2log = json::array();
  json log2phy = json::array();
  json counts = json::array();
  for (int l = 0; l < p.layers(); ++l) {
    const auto row = p.phy2log(l);
    phy2log.push_back(std::vector<int>(row.begin(), row.end()));
    json layer = json::array();
    for (int e = 0; e < p.num_logical(); ++e) {
      const auto slots = p.log2phy(l, e);
      layer.push_back(std::vector<int>(slots.begin(), slots.end()));
    }
    log2phy.push_back(std::move(layer));
    const auto c = p.replica_counts().row(l);
    counts.push_back(std::vector<int>(c.begin(), c.end()));
  }
  json bal = {{"before", nullptr}, {"after", r.balancedness_after}};
  if (r.balancedness_before) bal["before"] = *r.balancedness_before;
  return {{"phy2log", std::move(phy2log)},
          {"log2phy", std::move(log2phy)},
          {"replica_count", std::move(counts)},
          {"balancedness", std::move(bal)},
          {"moved_experts", r.moved_experts}};
}

std::string to_text(const plan_request& req, const plan_result& r) {
  const auto& p = r.after;
  std::string out = fmt::format(
      "{} layers, {} logical experts on {} slots over {} ranks ({} groups, {} nodes), policy {}\n", p.layers(),
      p.num_logical(), p.num_physical(), p.num_ranks(), req.num_groups, req.num_nodes, to_string(req.policy));
  for (int l = 0; l < p.layers(); ++l) {
    out += fmt::format("layer {}\n", l);
    const auto row = p.phy2log(l);
    for (int rank = 0; rank < p.num_ranks(); ++rank) {
      double tokens = 0.0;
      std::string experts;
      for (int s = 0; s < p.slots_per_rank(); ++s) {
        const expert_id e = row[rank * p.slots_per_rank() + s];
        const bool moved = req.old && req.old->phy2log(l)[rank * p.slots_per_rank() + s] != e;
        experts += fmt::format("{:>4}{}", e, moved ? "*" : " ");
        tokens += req.load(l, e) / p.replica_count(l, e);
      }
      out += fmt::format("  rank {:>3}: {}  load {:>10.1f}\n", rank, experts, tokens);
    }
  }
  if (r.balancedness_before) {
    out += fmt::format("balancedness {:.4f} -> {:.4f}, {} slots change expert (marked *)\n", *r.balancedness_before,
                       r.balancedness_after, r.moved_experts);
  } else {
    out += fmt::format("balancedness {:.4f} (no old placement given)\n", r.balancedness_after);
  }
  return out;
}

}  // namespace eplb::tools

// The merged report of `eplb simulate`: every rank's report combined into the run's outcome, and
// the readable summary of it.
#include "tools/simulate.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "tools/report/series.hpp"

namespace eplb::tools {
namespace {

using nlohmann::json;

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}

// Every error any rank reported, for the merged report: errors the run went on after (an injected
// transfer fault) and failures that ended a rank. At most 100; the rank reports keep the rest.
json collect_failures(const std::vector<json>& ranks, int& errors, int& last_error_step) {
  json list = json::array();
  std::size_t omitted = 0;
  const auto add = [&](json entry) {
    if (list.size() < 100) {
      list.push_back(std::move(entry));
    } else {
      ++omitted;
    }
  };
  for (const auto& r : ranks) {
    const int rank = r.value("rank", -1);
    for (const auto& e : r.value("errors", json::array())) {
      ++errors;
      last_error_step = std::max(last_error_step, e.value("step", -1));
      add({{"rank", rank}, {"step", e.value("step", -1)}, {"error", e.value("error", "")}, {"recovered", true}});
    }
    if (const auto f = r.value("failure", std::string()); !f.empty()) {
      add({{"rank", rank}, {"error", f}, {"recovered", false}});
    }
  }
  if (omitted > 0) list.push_back({{"omitted", omitted}});
  return list;
}

// The first rank whose commits (rebalance, layer, step) differ from the first surviving rank's, or -1.
int first_inconsistent(const std::vector<json>& ranks, const std::vector<bool>& alive) {
  std::optional<json> reference;  // the first live rank's: it served every step (rank 0)
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (!alive[i]) continue;
    auto commits = ranks[i].value("commits", json::array());
    if (!reference) {
      reference = std::move(commits);
      continue;
    }
    // --scale: a rank that joined late or left early is compared over the steps it served.
    const auto from = ranks[i].value("present_from", std::int64_t{1});
    const auto to = ranks[i].value("present_to", std::numeric_limits<std::int64_t>::max());
    json expected = json::array();
    for (const auto& c : *reference) {
      const auto step = c.at(2).get<std::int64_t>();
      if (step >= from && step <= to) expected.push_back(c);
    }
    if (commits != expected) return static_cast<int>(i);
  }
  return -1;
}

// The run's outcome: "verified" is true when every surviving rank (all but those that died on
// purpose, --fail-rank) verified its live slots: at the end, or after a failure (weights_intact).
// "failure" is set by any rank's failure, by commits that differ between ranks, and by a rank that
// exited unsuccessfully after writing its report; "failures" lists every rank's errors.
void merge_outcome(const std::vector<json>& ranks, json& out) {
  std::vector<bool> alive;
  bool verified = true;
  std::string failure, fallback;
  for (const auto& r : ranks) {
    alive.push_back(!r.value("died", false));
    if (alive.back()) verified = verified && (r.value("verified", false) || r.value("weights_intact", false));
    const auto f = r.value("failure", std::string());
    if (f.empty()) continue;
    if (alive.back() && failure.empty()) failure = f;  // a survivor names what went wrong
    if (fallback.empty()) fallback = f;
  }
  if (failure.empty()) failure = fallback;
  const int differs = first_inconsistent(ranks, alive);
  if (failure.empty() && differs >= 0) {
    failure =
        fmt::format("rank {} committed layers in other steps than rank 0 (maps may differ between ranks)", differs);
  }
  int errors = 0, last_error_step = -1;
  out["failures"] = collect_failures(ranks, errors, last_error_step);
  out["verified"] = verified;
  out["commit_steps_consistent"] = differs < 0;
  out["errors"] = errors;
  const auto& rb = out["rebalance_log"];
  out["rebalances_after_errors"] = errors == 0 ? 0 : std::count_if(rb.begin(), rb.end(), [&](const json& x) {
    return x.value("trigger_step", 0) > last_error_step;
  });
  if (!failure.empty()) out["failure"] = failure;
}

// Host time in step() over every rank's steps, in ms: all of them, those with a rebalance in
// flight, and the others.
void merge_step_times(const std::vector<json>& ranks, json& out) {
  std::vector<double> all, busy, idle;
  for (const auto& r : ranks) {
    for (double v : r.value("busy_us", std::vector<double>{})) busy.push_back(v / 1000), all.push_back(v / 1000);
    for (double v : r.value("idle_us", std::vector<double>{})) idle.push_back(v / 1000), all.push_back(v / 1000);
  }
  out["step_p50_ms"] = percentile(all, 0.5);
  out["step_p99_ms"] = percentile(all, 0.99);
  out["step_rebalancing_p50_ms"] = percentile(busy, 0.5);
  out["step_rebalancing_p99_ms"] = percentile(busy, 0.99);
  out["step_idle_p50_ms"] = percentile(idle, 0.5);
  out["step_idle_p99_ms"] = percentile(idle, 0.99);
  const auto summary = [](const std::vector<double>& ms) {
    return json{{"p50", percentile(ms, 0.5) * 1000},
                {"p90", percentile(ms, 0.9) * 1000},
                {"p99", percentile(ms, 0.99) * 1000},
                {"max", percentile(ms, 1.0) * 1000}};
  };
  out["step_time_us"] = {{"quiet", summary(idle)}, {"rebalancing", summary(busy)}};
}

// Bytes every rank received in each rebalance, summed over ranks (by the order they finished).
json bytes_per_rebalance(const std::vector<json>& ranks) {
  std::vector<double> sums;
  for (const auto& r : ranks) {
    const auto list = r.value("rebalances", json::array());
    if (sums.size() < list.size()) sums.resize(list.size(), 0.0);
    for (std::size_t i = 0; i < list.size(); ++i) sums[i] += list[i].value("bytes", 0.0);
  }
  return sums;
}

// Memory reserved for rebalances: the largest rank's (device and pinned host apart), and the
// allocations and overflows after the reserve, summed over ranks.
void merge_memory(const std::vector<json>& ranks, json& out) {
  std::uint64_t device_bytes = 0, pinned_bytes = 0;
  std::int64_t allocations = 0, overflows = 0;
  for (const auto& r : ranks) {
    device_bytes = std::max(device_bytes, r.value("reserved_device_bytes", std::uint64_t{0}));
    pinned_bytes = std::max(pinned_bytes, r.value("reserved_pinned_bytes", std::uint64_t{0}));
    allocations += r.value("allocations_after_reserve", std::int64_t{0});
    overflows += r.value("reserve_overflows", std::int64_t{0});
  }
  out["reserved_device_bytes"] = device_bytes;
  out["reserved_pinned_bytes"] = pinned_bytes;
  out["allocations_after_reserve"] = allocations;
  out["reserve_overflows"] = overflows;
}

// The survivors' recoveries, which must match (without rank and seconds), each with the longest
// any survivor's recover() took; `differs` names the first survivor that recovered otherwise.
json agreed_recoveries(const std::vector<json>& ranks, std::string& differs) {
  std::optional<json> agreed;
  std::vector<double> slowest;
  for (const auto& r : ranks) {
    if (r.value("died", false)) continue;
    json mine = json::array();
    for (auto x : r.value("recoveries", json::array())) {
      if (slowest.size() <= mine.size()) slowest.push_back(0);
      slowest[mine.size()] = std::max(slowest[mine.size()], x.value("seconds", 0.0));
      x.erase("rank");
      x.erase("seconds");
      mine.push_back(std::move(x));
    }
    if (!agreed) agreed = mine;
    if (mine != *agreed && differs.empty()) {
      differs = fmt::format("rank {} recovered differently from the first survivor", r.value("rank", -1));
    }
  }
  json out = agreed.value_or(json::array());
  for (std::size_t i = 0; i < out.size(); ++i) out[i]["seconds"] = slowest[i];
  return out;
}

// --survive: the rank sets the run served in (the first, then the survivors' from the step they
// recovered), and a failure when survivors did not recover alike (step, size, lost ranks, reloaded
// experts and the maps they went on with must match).
void merge_recoveries(const simulate_config& cfg, const std::vector<json>& ranks, json& out) {
  if (!cfg.survive) return;
  std::string differs;
  json sets = json::array({{{"step", 0}, {"num_ranks", cfg.ranks}}});
  for (auto& x : agreed_recoveries(ranks, differs)) sets.push_back(std::move(x));
  out["rank_sets"] = sets;
  if (sets.size() >= 2 && !out.value("commit_steps_consistent", true)) {
    // An async rebalance that a death ends may commit a layer on one rank a step before another
    // gives it up; recover() then takes each rank's own slots as they are (every slot verified).
    // Outside that window every rank must have committed alike.
    const auto outside = [&](const json& commit) {
      const auto step = commit.at(2).get<std::int64_t>();
      return step < cfg.fail_step || step > sets.back().value("step", std::int64_t{0});
    };
    std::vector<json> filtered;
    std::vector<bool> alive;
    for (const auto& r : ranks) {
      json commits = json::array();
      for (const auto& c : r.value("commits", json::array())) {
        if (outside(c)) commits.push_back(c);
      }
      filtered.push_back({{"commits", commits}});
      alive.push_back(!r.value("died", false));
    }
    out["commit_steps_consistent"] = first_inconsistent(filtered, alive) < 0;
    if (out["commit_steps_consistent"].get<bool>() &&
        out.value("failure", std::string()).find("committed layers in other steps") != std::string::npos) {
      out.erase("failure");
    }
  }
  if (!differs.empty()) {
    out["failure"] = differs;
  } else if (out.value("failure", std::string()) ==
             fmt::format("rank {}: died at step {} (injected)", cfg.fail_rank, cfg.fail_step)) {
    out.erase("failure");  // the death was asked for, and the survivors served on
  }
  if (!out.value("commit_steps_consistent", true) && !out.contains("failure")) {
    out["failure"] = "survivors committed layers in different steps outside the recovery";
  }
  if (sets.size() < 2 && !out.contains("failure")) out["failure"] = "the survivors never recovered";
}

// How each rank's run ended, without its step times and commits.
json rank_details(const std::vector<json>& ranks) {
  json details = json::array();
  for (const auto& r : ranks) {
    json d = {{"rank", r.value("rank", -1)}, {"failure", r.value("failure", std::string())}};
    for (const char* key : {"errors", "weights_intact", "communicators_made", "died", "exit_status", "maps_digest",
                            "stop_ms", "stopped", "reserved_device_bytes", "reserved_pinned_bytes", "reserve_overflows",
                            "allocations_after_reserve", "worker", "left", "present_from", "present_to"}) {
      if (r.contains(key)) d[key] = r[key];
    }
    details.push_back(d);
  }
  return details;
}

// The errors ranks reported (transfer faults the run went on after, and failures), a few lines.
std::string failures_text(const json& r) {
  const auto errors = r.value("errors", 0);
  std::string out;
  if (errors > 0) {
    out += fmt::format("errors: {} reported by ranks (the run went on; {} rebalances finished after the last)\n",
                       errors, r.value("rebalances_after_errors", 0));
  }
  int shown = 0;
  for (const auto& f : r.value("failures", json::array())) {
    if (!f.contains("error")) continue;
    if (++shown > 8) {
      out += "  ... (more in --json's \"failures\")\n";
      break;
    }
    if (f.value("recovered", false)) {
      out += fmt::format("  rank {} step {}: {}\n", f.value("rank", -1), f.value("step", -1), f.value("error", ""));
    } else {  // a failure names its rank itself
      out += fmt::format("  {} (ended the rank's run)\n", f.value("error", ""));
    }
  }
  return out;
}

// What the injected faults did, in words: who was hit, who named the error, whether the others'
// weights stayed intact. Empty without injected faults.
std::string injected_text(const simulate_config& cfg, const json& r) {
  std::string out;
  const bool intact = r.value("verified", false);
  if (cfg.fail_rank >= 0) {
    out += fmt::format("injected: rank {} died at step {}; the {} other ranks' weights {}\n", cfg.fail_rank,
                       cfg.fail_step, cfg.ranks - 1,
                       intact ? "verified intact (every live slot holds its mapped expert)" : "NOT all verified");
  }
  for (const auto& set : r.value("rank_sets", json::array())) {
    if (set.contains("layers_moved")) {  // --scale
      out += fmt::format("rescaled: before step {} to {} ranks (epoch {}), {} layers moved in {:.3f} s{}\n",
                         set.value("step", 0), set.value("num_ranks", 0), set.value("epoch", 0),
                         set.value("layers_moved", 0), set.value("seconds", 0.0),
                         set.value("fill_error", std::string()).empty() ? "" : "; the fill failed");
      continue;
    }
    if (set.value("step", 0) == 0) continue;
    out += fmt::format(
        "survived: from step {} on {} ranks without ranks {}, {} experts reloaded from the checkpoint, {} masked "
        "(recover() took {:.3f} s at most)\n",
        set.value("step", 0), set.value("num_ranks", 0), set.value("lost_ranks", json::array()).dump(),
        set.value("experts_reloaded", 0), set.value("masked", json::array()).size(), set.value("seconds", 0.0));
  }
  if (cfg.transfer_fault_rank >= 0) {
    int named = 0;
    for (const auto& f : r.value("failures", json::array())) named += f.value("recovered", false) ? 1 : 0;
    out += fmt::format(
        "injected: rank {}'s first batch after step {} failed; {} error(s) reported across ranks, {} rebalance(s) "
        "finished after them; weights {}\n",
        cfg.transfer_fault_rank, cfg.transfer_fault_step, named, r.value("rebalances_after_errors", 0),
        intact ? "verified on every rank" : "NOT all verified");
  }
  return out;
}

}  // namespace

json merge_reports(const simulate_config& cfg, const std::vector<json>& ranks) {
  json out;
  std::uint64_t bytes = 0;
  for (const auto& r : ranks) bytes += r.value("bytes_moved", std::uint64_t{0});
  const auto& rb = ranks.front().value("rebalances", json::array());
  out["rebalances"] = rb.size();
  out["balancedness_before"] = rb.empty() ? 0.0 : rb.front().value("before", 0.0);
  out["balancedness_after"] = rb.empty() ? 0.0 : rb.back().value("after", 0.0);
  out["bytes_moved"] = bytes;
  merge_step_times(ranks, out);
  out["rebalance_log"] = rb;
  out["bytes_per_rebalance"] = bytes_per_rebalance(ranks);
  if (auto series = merge_series(ranks, rb); !series.is_null()) out["series"] = std::move(series);
  out["ranks"] = cfg.ranks;
  out["steps"] = cfg.steps;
  out["policy"] = cfg.policy;
  if (const auto note = adjustment(cfg); !note.empty()) out["preset_adjusted"] = note;
  merge_memory(ranks, out);
  merge_outcome(ranks, out);
  merge_recoveries(cfg, ranks, out);
  if (!cfg.scale.empty()) out["rank_sets"] = ranks.front().value("rank_sets", json::array());
  out["rank_reports"] = rank_details(ranks);
  return out;
}

std::string summary_table(const simulate_config& cfg, const json& r) {
  std::string out =
      fmt::format("eplb simulate: preset {}, {} ranks ({}), {}, {} backend, {} device, {} steps\n", cfg.preset,
                  cfg.ranks, cfg.procs ? "processes" : "threads", cfg.use_async ? "async" : "sync",
                  resolved_backend(cfg), device::to_string(cfg.device), cfg.steps);
  if (r.contains("preset_adjusted"))
    out += fmt::format("preset adjusted: {}\n", r["preset_adjusted"].get<std::string>());
  out += fmt::format("{:>9}  {:>12}  {:>11}  {:>27}  {:>11}\n", "rebalance", "trigger step", "commit step",
                     "balancedness before -> after", "duration ms");
  int i = 0;
  for (const auto& rb : r["rebalance_log"]) {
    out += fmt::format("{:>9}  {:>12}  {:>11}  {:>18.4f} -> {:.4f}  {:>11.1f}\n", ++i, rb.value("trigger_step", 0),
                       rb.value("finish_step", 0), rb.value("before", 0.0), rb.value("after", 0.0),
                       rb.value("seconds", 0.0) * 1000);
  }
  out += fmt::format("ideal balancedness 1.0000; bytes moved (all ranks) {:.2f} MB\n",
                     r.value("bytes_moved", std::uint64_t{0}) / 1e6);
  out += fmt::format(
      "host time in step(): while rebalancing p50 {:.3f} ms / p99 {:.3f} ms; otherwise p50 {:.3f} / p99 {:.3f} ms\n",
      r.value("step_rebalancing_p50_ms", 0.0), r.value("step_rebalancing_p99_ms", 0.0),
      r.value("step_idle_p50_ms", 0.0), r.value("step_idle_p99_ms", 0.0));
  out += fmt::format(
      "reserved for rebalances (largest rank): device {:.2f} MB, pinned host {:.2f} MB; allocations after the "
      "reserve: {} (overflows {})\n",
      r.value("reserved_device_bytes", std::uint64_t{0}) / 1e6,
      r.value("reserved_pinned_bytes", std::uint64_t{0}) / 1e6, r.value("allocations_after_reserve", std::int64_t{0}),
      r.value("reserve_overflows", std::int64_t{0}));
  out += fmt::format("verification: {}; commits in the same step on every rank: {}\n",
                     r.value("verified", false) ? "every committed layer verified on every surviving rank" : "FAILED",
                     r.value("commit_steps_consistent", false) ? "yes" : "NO");
  out += failures_text(r);
  out += injected_text(cfg, r);
  if (r.contains("failure")) out += fmt::format("failure: {}\n", r["failure"].get<std::string>());
  return out;
}

}  // namespace eplb::tools

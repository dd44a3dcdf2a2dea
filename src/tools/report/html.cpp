#include "tools/report/html.hpp"

#include <fmt/format.h>

#include "tools/report/svg.hpp"

namespace eplb::tools {
namespace {

using nlohmann::json;

constexpr const char* style = R"(body{font-family:sans-serif;margin:24px;color:#222;max-width:960px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}.chart{display:block;margin:8px 0;background:#fff}
.frame{fill:none;stroke:#999}.grid{stroke:#eee}.tick,.legend{font-size:11px;fill:#444}
.title{font-size:13px;font-weight:bold;fill:#222}.series{stroke-width:1.6}.marker{stroke-width:1.5;stroke-dasharray:4 3}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.ok{color:#2ca02c}.bad{color:#d62728}.key span{margin-right:16px})";

std::vector<double> numbers(const json& array) {
  std::vector<double> out;
  for (const auto& v : array) out.push_back(v.get<double>());
  return out;
}

// Rebalances by trigger step, coloured by outcome, and the steps at which ranks reported errors.
std::vector<svg::marker> outcome_markers(const json& report) {
  std::vector<svg::marker> marks;
  int i = 0;
  for (const auto& rb : report["rebalance_log"]) {
    const bool skipped = rb.value("skipped", false);
    marks.push_back(
        {rb.value("trigger_step", 0.0), skipped ? "#7f7f7f" : "#2ca02c",
         fmt::format("rebalance {}: {} at step {}, {:.4f} -> {:.4f}", ++i, skipped ? "skipped" : "committed",
                     rb.value("finish_step", 0), rb.value("before", 0.0), rb.value("after", 0.0))});
  }
  for (const auto& f : report.value("failures", json::array())) {
    if (f.value("step", -1) < 0) continue;
    marks.push_back(
        {f.value("step", 0.0), "#d62728",
         fmt::format("rank {} step {}: {}", f.value("rank", -1), f.value("step", -1), f.value("error", ""))});
  }
  return marks;
}

std::string balancedness_charts(const json& report) {
  const auto& s = report["series"];
  const auto steps = numbers(s["steps"]);
  std::string out =
      "<h2>Balancedness over the steps</h2>"
      "<p class=\"key\"><span style=\"color:#2ca02c\">| rebalance committed</span>"
      "<span style=\"color:#7f7f7f\">| skipped</span><span style=\"color:#d62728\">| error</span></p>";
  out += svg::line_chart(
      "global-balancedness", "Global balancedness (mean / max load over ranks, averaged over layers)", steps,
      {{"global", numbers(s["global_balancedness"]), svg::palette(0)}}, {0, 1}, outcome_markers(report));
  std::vector<svg::series> ranks;
  for (std::size_t r = 0; r < s["rank_share"].size(); ++r) {
    ranks.push_back({fmt::format("rank {}", r), numbers(s["rank_share"][r]), svg::palette(r)});
  }
  out += svg::line_chart("rank-load", "Per-rank load relative to the mean (1 = even)", steps, ranks, {0, 0},
                         outcome_markers(report));
  return out;
}

std::string worst_layer_charts(const json& report) {
  std::string out = "<h2>Worst layer, per-rank load before and after each rebalance</h2>";
  int shown = 0;
  for (const auto& w : report["series"]["worst_layers"]) {
    if (++shown > 6) {
      out += "<p>(the first 6 rebalances are shown)</p>";
      break;
    }
    std::vector<std::string> labels;
    for (std::size_t r = 0; r < w["before"].size(); ++r) labels.push_back(fmt::format("rank {}", r));
    out += svg::bar_chart(fmt::format("worst-layer-{}", w.value("rebalance", 0)),
                          fmt::format("Rebalance {}: layer {} (tokens per rank in a sample interval)",
                                      w.value("rebalance", 0), w.value("layer", 0)),
                          labels,
                          {{"before", numbers(w["before"]), "#d62728"}, {"after", numbers(w["after"]), "#2ca02c"}});
  }
  return shown == 0 ? out + "<p>No rebalance finished with a sample after it.</p>" : out;
}

std::string bytes_and_times(const json& report) {
  std::vector<std::string> labels;
  std::vector<double> mb;
  int i = 0;
  for (const auto& b : report.value("bytes_per_rebalance", json::array())) {
    labels.push_back(fmt::format("{}", ++i));
    mb.push_back(b.get<double>() / 1e6);
  }
  std::string out = "<h2>Bytes moved per rebalance</h2>";
  out += svg::bar_chart("bytes-moved", "MB received, all ranks, per rebalance", labels, {{"MB", mb, svg::palette(0)}});
  out += "<h2>Host time in step()</h2>";
  const auto& t = report["step_time_us"];
  const std::vector<std::string> qs{"p50", "p90", "p99", "max"};
  std::vector<double> quiet, busy;
  for (const auto& q : qs) {
    quiet.push_back(t["quiet"].value(q, 0.0));
    busy.push_back(t["rebalancing"].value(q, 0.0));
  }
  out += svg::bar_chart("step-times", "Host time in step(), microseconds", qs,
                        {{"no rebalance in flight", quiet, svg::palette(0)}, {"rebalancing", busy, svg::palette(1)}});
  return out;
}

std::string rebalance_table(const json& report) {
  std::string out =
      "<h2>Rebalances</h2><table><tr><th>#</th><th>trigger step</th><th>commit step</th><th>balancedness "
      "before</th><th>after</th><th>outcome</th><th>ms</th></tr>";
  int i = 0;
  for (const auto& rb : report["rebalance_log"]) {
    out += fmt::format(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.4f}</td><td>{:.4f}</td><td>{}</td><td>{:.1f}</td></tr>", ++i,
        rb.value("trigger_step", 0), rb.value("finish_step", 0), rb.value("before", 0.0), rb.value("after", 0.0),
        rb.value("skipped", false) ? "skipped" : "committed", rb.value("seconds", 0.0) * 1000);
  }
  return out + "</table>";
}

std::string header(const simulate_config& cfg, const json& report) {
  const bool ok = report.value("verified", false) && !report.contains("failure");
  std::string out = fmt::format(
      "<h1>eplb simulate: preset {}, {} ranks ({}), {}, {} backend, {} device, {} steps, policy {}</h1>",
      svg::escape(cfg.preset), cfg.ranks, cfg.procs ? "processes" : "threads", cfg.use_async ? "async" : "sync",
      svg::escape(resolved_backend(cfg)), device::to_string(cfg.device), cfg.steps, svg::escape(cfg.policy));
  out += fmt::format("<p class=\"{}\" id=\"outcome\">{}</p>", ok ? "ok" : "bad",
                     ok ? "Every committed layer verified on every rank; commits in the same step everywhere."
                        : svg::escape(report.value("failure", std::string("verification failed"))));
  if (report.contains("preset_adjusted")) {
    out += fmt::format("<p>Preset adjusted: {}</p>", svg::escape(report["preset_adjusted"].get<std::string>()));
  }
  return out;
}

}  // namespace

std::string html_report(const simulate_config& cfg, const json& report) {
  std::string page = fmt::format(
      "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>eplb simulate "
      "report</title><style>{}</style></head><body>",
      style);
  page += header(cfg, report);
  if (report.contains("series") && !report["series"].is_null()) {
    page += balancedness_charts(report) + worst_layer_charts(report);
  } else {
    page += "<p>No load samples: every rank failed before its first sample.</p>";
  }
  page += bytes_and_times(report) + rebalance_table(report);
  return page + "</body></html>\n";
}

}  // namespace eplb::tools

#include "tools/report/series.hpp"

#include <algorithm>
#include <map>

namespace eplb::tools {
namespace {

using nlohmann::json;
using load_table = std::vector<double>;  // layers x ranks: tokens each rank received, per layer

struct sampled_run {
  int layers = 0, ranks = 0, every = 1;
  std::map<int, load_table> by_step;  // summed over the ranks that routed them
};

sampled_run sum_samples(const std::vector<json>& reports) {
  sampled_run run;
  for (const auto& r : reports) {
    if (!r.contains("samples")) continue;
    const auto& s = r["samples"];
    run.layers = s.value("layers", 0);
    run.ranks = s.value("ranks", 0);
    run.every = s.value("every", 1);
    const auto steps = s.value("steps", std::vector<int>{});
    const auto& loads = s["loads"];
    for (std::size_t i = 0; i < steps.size() && i < loads.size(); ++i) {
      auto& table = run.by_step[steps[i]];
      table.resize(static_cast<std::size_t>(run.layers) * static_cast<std::size_t>(run.ranks), 0.0);
      for (std::size_t k = 0; k < table.size() && k < loads[i].size(); ++k) table[k] += loads[i][k].get<double>();
    }
  }
  return run;
}

double layer_balancedness(const load_table& t, int ranks, int layer) {
  double sum = 0, max = 0;
  for (int r = 0; r < ranks; ++r) {
    const double v = t[static_cast<std::size_t>(layer * ranks + r)];
    sum += v;
    max = std::max(max, v);
  }
  return max > 0 ? sum / ranks / max : 1.0;
}

double balancedness(const load_table& t, int layers, int ranks) {
  double total = 0;
  for (int l = 0; l < layers; ++l) total += layer_balancedness(t, ranks, l);
  return layers > 0 ? total / layers : 1.0;
}

std::vector<double> layer_loads(const load_table& t, int ranks, int layer) {
  return {t.begin() + layer * ranks, t.begin() + (layer + 1) * ranks};
}

// The worst layer of the last sample before `trigger`, and its loads then and in the first sample
// that lies wholly after `finish` (the new maps serving).
json worst_layer(const sampled_run& run, int index, int trigger, int finish, int every) {
  auto before = run.by_step.upper_bound(trigger);
  if (before == run.by_step.begin()) return nullptr;
  --before;
  const auto after = run.by_step.lower_bound(finish + every);
  if (after == run.by_step.end()) return nullptr;
  int worst = 0;
  for (int l = 1; l < run.layers; ++l) {
    if (layer_balancedness(before->second, run.ranks, l) < layer_balancedness(before->second, run.ranks, worst)) {
      worst = l;
    }
  }
  return {{"rebalance", index},
          {"layer", worst},
          {"before", layer_loads(before->second, run.ranks, worst)},
          {"after", layer_loads(after->second, run.ranks, worst)}};
}

}  // namespace

json merge_series(const std::vector<json>& ranks, const json& rebalance_log) {
  const auto run = sum_samples(ranks);
  if (run.by_step.empty() || run.ranks == 0) return nullptr;
  json steps = json::array(), global = json::array();
  std::vector<std::vector<double>> share(static_cast<std::size_t>(run.ranks));
  for (const auto& [step, table] : run.by_step) {
    steps.push_back(step);
    global.push_back(balancedness(table, run.layers, run.ranks));
    std::vector<double> per_rank(static_cast<std::size_t>(run.ranks), 0.0);
    for (int l = 0; l < run.layers; ++l) {
      for (int r = 0; r < run.ranks; ++r)
        per_rank[static_cast<std::size_t>(r)] += table[static_cast<std::size_t>(l * run.ranks + r)];
    }
    double mean = 0;
    for (double v : per_rank) mean += v / run.ranks;
    for (int r = 0; r < run.ranks; ++r)
      share[static_cast<std::size_t>(r)].push_back(mean > 0 ? per_rank[static_cast<std::size_t>(r)] / mean : 0.0);
  }
  json worst = json::array();
  int index = 0;
  for (const auto& rb : rebalance_log) {
    ++index;
    if (auto w = worst_layer(run, index, rb.value("trigger_step", 0), rb.value("finish_step", 0), run.every);
        !w.is_null()) {
      worst.push_back(std::move(w));
    }
  }
  return {{"steps", steps}, {"global_balancedness", global}, {"rank_share", share}, {"worst_layers", worst}};
}

}  // namespace eplb::tools

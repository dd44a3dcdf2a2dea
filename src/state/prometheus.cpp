// Prometheus text exposition format 0.0.4 of one rank's metrics: a HELP and a TYPE line per metric
// family, then its samples, each labelled rank="N" so that an engine can concatenate the text of
// every rank it serves or relabel it.
#include <fmt/format.h>

#include <cmath>

#include "state/records.hpp"
#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {

// Prometheus values: Go's float syntax, with +Inf, -Inf and NaN spelled out.
std::string number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  return fmt::format("{}", v);
}

struct writer {
  std::string out;
  std::string_view prefix;
  int rank;

  void family(std::string_view name, std::string_view type, std::string_view help) {
    out += fmt::format("# HELP {}_{} {}\n# TYPE {}_{} {}\n", prefix, name, help, prefix, name, type);
  }
  void sample(std::string_view name, double v, std::string_view extra_labels = {}) {
    out += fmt::format("{}_{}{{rank=\"{}\"{}{}}} {}\n", prefix, name, rank, extra_labels.empty() ? "" : ",",
                       extra_labels, number(v));
  }
  void scalar(std::string_view name, std::string_view type, std::string_view help, double v) {
    family(name, type, help);
    sample(name, v);
  }
  template <std::size_t N>
  void hist(std::string_view name, std::string_view help, const histogram<N>& h) {
    family(name, "histogram", help);
    std::uint64_t cumulative = 0;
    const auto bucket = fmt::format("{}_bucket", name);
    for (std::size_t i = 0; i <= N; ++i) {
      cumulative += h.counts[i];
      const auto le = i < N ? number(h.bounds[i]) : std::string("+Inf");
      sample(bucket, static_cast<double>(cumulative), fmt::format("le=\"{}\"", le));
    }
    sample(fmt::format("{}_sum", name), h.sum);
    sample(fmt::format("{}_count", name), static_cast<double>(h.count));
  }
};

void check_prefix(std::string_view prefix) {
  const auto first = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':'; };
  bool ok = !prefix.empty() && first(prefix[0]);
  for (const char c : prefix) ok = ok && (first(c) || std::isdigit(static_cast<unsigned char>(c)));
  if (!ok) {
    fail(errc::invalid_argument,
         "eplb_state::prometheus_text: prefix \"{}\" is not a metric name "
         "([a-zA-Z_:][a-zA-Z0-9_:]*)",
         prefix.substr(0, 64));
  }
}

}  // namespace

std::string prometheus_text(std::string_view prefix, int rank, const metrics& m, const record_totals& t,
                            int generation) {
  check_prefix(prefix);
  writer w{{}, prefix, rank};
  w.scalar("steps_total", "counter", "step() calls.", static_cast<double>(m.steps));
  w.scalar("rebalances_started_total", "counter", "Rebalances triggered.", static_cast<double>(m.rebalances));
  w.family("rebalances_total", "counter", "Rebalances ended on this rank, by outcome.");
  for (const auto o : {rebalance_outcome::committed, rebalance_outcome::skipped, rebalance_outcome::failed,
                       rebalance_outcome::stopped}) {
    w.sample("rebalances_total", static_cast<double>(t.by_outcome[static_cast<std::size_t>(o)]),
             fmt::format("outcome=\"{}\"", to_string(o)));
  }
  w.scalar("layers_committed_total", "counter", "Layers committed by rebalances.",
           static_cast<double>(m.layers_committed));
  w.family("bytes_moved_total", "counter", "Expert bytes this rank moved over the communicator.");
  w.sample("bytes_moved_total", static_cast<double>(t.bytes_sent), "direction=\"sent\"");
  w.sample("bytes_moved_total", static_cast<double>(t.bytes_received), "direction=\"received\"");
  w.family("bytes_moved_by_locality_total", "counter", "Bytes sent and received, same node or across nodes.");
  w.sample("bytes_moved_by_locality_total", static_cast<double>(t.bytes_same_node), "locality=\"same_node\"");
  w.sample("bytes_moved_by_locality_total", static_cast<double>(t.bytes_cross_node), "locality=\"cross_node\"");
  w.scalar("balancedness_before", "gauge", "Last rebalance: balancedness of the old maps (all ranks' load).",
           m.balancedness_before);
  w.scalar("balancedness_after", "gauge", "Last rebalance: balancedness of the new maps (all ranks' load).",
           m.balancedness_after);
  w.scalar("rebalance_in_flight", "gauge", "1 while a rebalance is in flight.", m.rebalance_in_flight ? 1 : 0);
  w.scalar("communicator_generation", "gauge", "Times the communicator was made again.", generation);
  w.scalar("rank_set_epoch", "gauge", "Rank-set changes so far (rescale, recover).",
           static_cast<double>(m.rank_set_epoch));
  w.scalar("masked_experts", "gauge", "(layer, expert) pairs served without: lost with a rank, not reloaded.",
           static_cast<double>(m.masked_experts));
  w.scalar("reserved_device_bytes", "gauge", "Device memory reserved for rebalances.",
           static_cast<double>(m.reserved_device_bytes));
  w.scalar("reserved_pinned_bytes", "gauge", "Pinned host memory reserved for rebalances.",
           static_cast<double>(m.reserved_pinned_bytes));
  w.scalar("reserve_overflows_total", "counter", "Allocations rebalances made past the reservation.",
           static_cast<double>(m.reserve_overflows));
  w.hist("rebalance_duration_seconds", "Rebalances from trigger to end.", t.rebalance_seconds);
  w.hist("step_overhead_seconds", "Host time spent in step().", t.step_seconds);
  return std::move(w.out);
}

}  // namespace eplb::state_detail

// The default policy reproduces vLLM's DefaultEplbPolicy (itself DeepSeek's EPLB in numpy) so that
// both give the same phy2log for the same load. The numeric details that make that hold are noted
// where they occur: float32 loads, numpy's pairwise float32 sum, float64 per-replica loads.
#include "eplb/core/policy.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>

#include "core/policy_detail.hpp"
#include "util/fail.hpp"

namespace eplb {

policy_kind parse_policy(std::string_view name, std::string_view field) {
  if (name == "default") return policy_kind::deepseek_default;
  if (name == "min_move") return policy_kind::min_move;
  if (name == "min_move") return policy_kind::min_move;
  fail(errc::invalid_argument, "{}: unknown policy \"{}\" (allowed: \"default\", \"min_move\")", field, name);
}

std::string_view to_string(policy_kind kind) noexcept {
  switch (kind) {
    case policy_kind::deepseek_default:
      return "default";
    case policy_kind::min_move:
      return "min_move";
  }
  return "unknown";
}

namespace {

// numpy's float32 add-reduce over a contiguous axis: pairwise summation with 8 accumulators in
// blocks of up to 128 elements. Reproduced so group sums round exactly as vLLM's do.
float pairwise_sum(const float* a, std::size_t n) {
  if (n < 8) {
    float res = 0.0F;
    for (std::size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    float r[8];
    for (std::size_t j = 0; j < 8; ++j) r[j] = a[j];
    std::size_t i = 8;
    for (; i < n - n % 8; i += 8) {
      for (std::size_t j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  std::size_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// Loads here are finite and >= +0.0, so their IEEE bit patterns order like their values: comparing
// integers instead of doubles makes the hot loops branch-free. A 128-bit key appends the index for
// the tie-break, so one integer compare gives "larger first, lower index on ties".
using key128 = unsigned __int128;
std::uint64_t bits(double v) {
  return std::bit_cast<std::uint64_t>(v);
}
key128 argmax_key(double v, int index) {
  return (static_cast<key128>(bits(v)) << 64) | static_cast<std::uint32_t>(~static_cast<std::uint32_t>(index));
}
int argmax_index(key128 key) {
  return static_cast<int>(~static_cast<std::uint32_t>(key));
}
// Smaller first, lower index on ties.
key128 argmin_key(double v, int index) {
  return (static_cast<key128>(bits(v)) << 64) | static_cast<std::uint32_t>(index);
}

// Scratch space reused across layers so the policy allocates once per call.
struct scratch {
  std::vector<std::uint64_t> order;
  std::vector<double> pack_sum;
  std::vector<int> pack_items;
  std::vector<key128> heap;
};

// Packs n weighted items into num_packs packs of exactly n / num_packs items: heaviest first, each
// into the lightest pack that still has room (lowest index on ties; items of equal weight in index
// order, i.e. a stable descending sort). O(n log n).
template <typename W>
void balanced_packing(std::span<const W> weight, int num_packs, std::span<int> pack, std::span<int> rank_in_pack,
                      scratch& s) {
  const auto n = static_cast<int>(weight.size());
  const int per_pack = n / num_packs;
  if (per_pack == 1) {
    std::iota(pack.begin(), pack.end(), 0);
    std::fill(rank_in_pack.begin(), rank_in_pack.end(), 0);
    return;
  }
  // Heaviest first, index order among equals (a stable descending sort). Sorted as 64-bit keys:
  // the inverted weight bits with the low bits replaced by the index. Where that truncation makes
  // weights collide, the run is re-sorted on the exact weights, so the order is exact.
  const int index_bits = std::max(1, static_cast<int>(std::bit_width(static_cast<unsigned>(n - 1))));
  const std::uint64_t index_mask = (std::uint64_t{1} << index_bits) - 1;
  s.order.resize(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    s.order[i] = (~bits(static_cast<double>(weight[i])) & ~index_mask) | static_cast<std::uint64_t>(i);
  }
  std::sort(s.order.begin(), s.order.end());
  for (int a = 0; a < n;) {
    int b = a + 1;
    while (b < n && (s.order[b] & ~index_mask) == (s.order[a] & ~index_mask)) ++b;
    if (b - a > 1) {
      std::sort(s.order.begin() + a, s.order.begin() + b, [&](std::uint64_t x, std::uint64_t y) {
        const double wx = weight[x & index_mask];
        const double wy = weight[y & index_mask];
        return wx > wy || (wx == wy && (x & index_mask) < (y & index_mask));
      });
    }
    a = b;
  }
  // The lightest pack that still has room, lowest index on ties: a min-heap keyed like argmax_key's
  // mirror image (weight bits, then index). A full pack leaves the heap, which is what vLLM's
  // weight of inf achieves in its linear argmin, so the choice is the same at O(log packs) a step.
  s.pack_sum.assign(static_cast<std::size_t>(num_packs), 0.0);
  s.pack_items.assign(static_cast<std::size_t>(num_packs), 0);
  s.heap.resize(static_cast<std::size_t>(num_packs));
  for (int k = 0; k < num_packs; ++k) s.heap[k] = argmin_key(0.0, k);  // ascending: already a min-heap
  const auto lighter_on_top = std::greater<key128>{};
  for (const std::uint64_t key : s.order) {
    const auto item = static_cast<int>(key & index_mask);
    std::pop_heap(s.heap.begin(), s.heap.end(), lighter_on_top);
    const auto best = static_cast<int>(static_cast<std::uint32_t>(s.heap.back()));
    s.heap.pop_back();
    pack[item] = best;
    rank_in_pack[item] = s.pack_items[best];
    s.pack_sum[best] += static_cast<double>(weight[item]);
    if (++s.pack_items[best] == per_pack) continue;
    s.heap.push_back(argmin_key(s.pack_sum[best], best));
    std::push_heap(s.heap.begin(), s.heap.end(), lighter_on_top);
  }
}

// Gives num_phy - num_log extra replicas, one at a time, to the expert with the highest load per
// replica (float32 load / count in float64, lowest index on ties). phy2log[i] = i for i < num_log.
void replicate_experts(std::span<const float> weight, std::span<int> phy2log, std::span<int> count, scratch& s) {
  const auto num_log = static_cast<int>(weight.size());
  const auto num_phy = static_cast<int>(phy2log.size());
  std::iota(phy2log.begin(), phy2log.begin() + num_log, 0);
  std::fill(count.begin(), count.end(), 1);
  if (num_phy == num_log) return;
  // Max-heap on (load per replica, lowest index): the top is numpy's argmax.
  s.heap.resize(static_cast<std::size_t>(num_log));
  for (int e = 0; e < num_log; ++e) s.heap[e] = argmax_key(static_cast<double>(weight[e]), e);
  std::make_heap(s.heap.begin(), s.heap.end());
  for (int i = num_log; i < num_phy; ++i) {
    std::pop_heap(s.heap.begin(), s.heap.end());
    const int e = argmax_index(s.heap.back());
    phy2log[i] = e;
    ++count[e];
    s.heap.back() = argmax_key(static_cast<double>(weight[e]) / static_cast<double>(count[e]), e);
    std::push_heap(s.heap.begin(), s.heap.end());
  }
}

void invert(std::span<const int> perm, std::span<int> inverse) {
  for (std::size_t i = 0; i < perm.size(); ++i) inverse[perm[i]] = static_cast<int>(i);
}

// One layer of DeepSeek's hierarchical balancing; global balancing is num_groups = num_nodes = 1.
struct hierarchical_layer {
  hierarchical_layer(int experts_, int groups_, int nodes_, int gpus_, int replicas_)
      : experts(experts_), groups(groups_), nodes(nodes_), gpus(gpus_), replicas(replicas_) {}
  int experts, groups, nodes, gpus, replicas;
  int group_size() const { return experts / groups; }
  int groups_per_node() const { return groups / nodes; }
  int experts_per_node() const { return experts / nodes; }
  int replicas_per_node() const { return replicas / nodes; }
  int replicas_per_gpu() const { return replicas / gpus; }
  int gpus_per_node() const { return gpus / nodes; }

  std::vector<float> group_load, node_load;
  std::vector<double> replica_load;
  std::vector<int> group_pack, group_rank, log2mlog, mlog2log;
  std::vector<int> phy2mlog, mlog_count, pack, rank, phy2pphy, pphy2phy;
  scratch s;

  void run(std::span<const float> w, std::span<expert_id> out) {
    const int gs = group_size();
    // Step 1: groups -> nodes. Each node gets groups_per_node whole groups.
    group_load.resize(groups);
    for (int g = 0; g < groups; ++g) group_load[g] = pairwise_sum(w.data() + g * gs, static_cast<std::size_t>(gs));
    group_pack.resize(groups);
    group_rank.resize(groups);
    balanced_packing<float>(group_load, nodes, group_pack, group_rank, s);
    log2mlog.resize(experts);
    mlog2log.resize(experts);
    for (int e = 0; e < experts; ++e) {
      const int g = e / gs;
      log2mlog[e] = (group_pack[g] * groups_per_node() + group_rank[g]) * gs + e % gs;
    }
    invert(log2mlog, mlog2log);

    const int epn = experts_per_node();
    const int rpn = replicas_per_node();
    node_load.resize(epn);
    phy2mlog.resize(rpn);
    mlog_count.resize(epn);
    replica_load.resize(rpn);
    pack.resize(rpn);
    rank.resize(rpn);
    phy2pphy.resize(rpn);
    pphy2phy.resize(rpn);
    for (int n = 0; n < nodes; ++n) {
      // Step 2: replicate within the node, over the node's experts only.
      for (int m = 0; m < epn; ++m) node_load[m] = w[mlog2log[n * epn + m]];
      replicate_experts(node_load, phy2mlog, mlog_count, s);
      // Step 3: pack the node's replicas onto its GPUs by load per replica.
      for (int i = 0; i < rpn; ++i) {
        const int m = phy2mlog[i];
        replica_load[i] = static_cast<double>(node_load[m]) / static_cast<double>(mlog_count[m]);
      }
      balanced_packing<double>(replica_load, gpus_per_node(), pack, rank, s);
      for (int i = 0; i < rpn; ++i) phy2pphy[i] = pack[i] * replicas_per_gpu() + rank[i];
      invert(phy2pphy, pphy2phy);
      for (int j = 0; j < rpn; ++j) out[n * rpn + j] = mlog2log[phy2mlog[pphy2phy[j]] + n * epn];
    }
  }
};

}  // namespace

namespace {

// Marks, for each old slot of one rank in order, the first unused new slot holding its expert
// (s.used over new slots, s.kept over old ones). Large ranks sort their new slots by (expert, slot)
// and take an expert's slots front to back, one binary search per old slot: O(n log n) where a
// scan per old slot was O(n^2) (16 s for 200,000 slots on one rank). Small ranks scan: faster there.
void match_kept(std::span<const expert_id> fresh, std::span<const expert_id> old, detail::preserve_scratch& s) {
  const std::size_t n = fresh.size();
  std::fill(s.used.begin(), s.used.end(), 0);
  if (n <= 64) {
    for (std::size_t slot = 0; slot < n; ++slot) {
      std::size_t j = 0;
      while (j < n && (s.used[j] || fresh[j] != old[slot])) ++j;
      s.kept[slot] = j < n;
      if (j < n) s.used[j] = 1;
    }
    return;
  }
  // (expert, slot) as one integer: the expert's sign bit flipped so -1 (empty) sorts first.
  const auto expert_key = [](expert_id e) {
    return static_cast<std::uint64_t>(static_cast<std::uint32_t>(e) ^ 0x80000000U) << 32;
  };
  for (std::size_t j = 0; j < n; ++j) s.sorted[j] = expert_key(fresh[j]) | j;
  std::sort(s.sorted.begin(), s.sorted.end());
  std::fill(s.taken.begin(), s.taken.end(), 0);
  for (std::size_t slot = 0; slot < n; ++slot) {
    const std::uint64_t key = expert_key(old[slot]);
    const auto first =
        static_cast<std::size_t>(std::lower_bound(s.sorted.begin(), s.sorted.end(), key) - s.sorted.begin());
    const std::size_t at = first + s.taken[first];  // taken is counted at the expert's first entry
    s.kept[slot] = at < n && (s.sorted[at] & ~std::uint64_t{0xFFFFFFFF}) == key;
    if (!s.kept[slot]) continue;
    ++s.taken[first];
    s.used[s.sorted[at] & 0xFFFFFFFF] = 1;
  }
}

}  // namespace

// Puts experts a rank keeps back into the slots they occupied before (for each old slot in order,
// the first unused new slot with that expert); experts new to the rank fill the remaining slots in
// order.
void detail::preserve_rank_slots(std::span<expert_id> row, std::span<const expert_id> old_row, int num_ranks,
                                 preserve_scratch& s) {
  const auto per_rank = static_cast<std::size_t>(row.size()) / static_cast<std::size_t>(num_ranks);
  s.fresh.resize(per_rank);
  s.sorted.resize(per_rank);
  s.taken.resize(per_rank + 1);  // + 1: an expert the rank lacks may search to the end
  s.used.resize(per_rank);
  s.kept.resize(per_rank);
  for (std::size_t base = 0; base < row.size(); base += per_rank) {
    std::copy_n(row.begin() + static_cast<std::ptrdiff_t>(base), per_rank, s.fresh.begin());
    match_kept(s.fresh, old_row.subspan(base, per_rank), s);
    std::size_t next_fresh = 0;
    for (std::size_t slot = 0; slot < per_rank; ++slot) {
      if (s.kept[slot]) {
        row[base + slot] = old_row[base + slot];
        continue;
      }
      while (s.used[next_fresh]) ++next_fresh;
      row[base + slot] = s.fresh[next_fresh++];
    }
  }
}

namespace {

// Loads must be finite, >= 0, and every layer's total below max_layer_load: the default policy sums
// groups in float32, and a sum that overflows to inf breaks its packing (experts went missing from
// the placement for loads near FLT_MAX). The error names the entry where the total crosses it.
void validate_loads(const matrix<double>& load) {
  for (std::size_t l = 0; l < load.rows(); ++l) {
    double total = 0.0;
    for (std::size_t e = 0; e < load.cols(); ++e) {
      const double v = load(l, e);
      if (!(v >= 0.0 && v <= std::numeric_limits<float>::max())) {  // true for NaN too
        if (!std::isfinite(v) || v < 0.0) {
          fail(errc::invalid_argument, "load[{}][{}]: must be a finite number >= 0, got {}", l, e, v);
        }
        fail(errc::invalid_argument, "load[{}][{}]: {} does not fit in float32", l, e, v);
      }
      total += v;
      if (total >= max_layer_load) {
        fail(errc::invalid_argument,
             "load[{}][{}]: layer {}'s total load reaches {:g} here, at or above the allowed {:g} (float32 sums of "
             "the policy must not overflow; scale the loads down)",
             l, e, l, total, max_layer_load);
      }
    }
  }
}

// A defensive check of a policy's output, so that a broken placement is an error and not silently
// lost experts: every layer has num_replicas slots and holds every logical expert at least once.
matrix<expert_id> every_expert_placed(policy_kind kind, const rebalance_input& in, matrix<expert_id> out) {
  const auto experts = in.load.cols();
  if (out.rows() != in.load.rows() || out.cols() != static_cast<std::size_t>(in.num_replicas)) {
    fail(errc::internal, "policy {}: returned {}x{} slots, expected {}x{}", to_string(kind), out.rows(), out.cols(),
         in.load.rows(), in.num_replicas);
  }
  std::vector<char> seen(experts);
  for (std::size_t l = 0; l < out.rows(); ++l) {
    std::fill(seen.begin(), seen.end(), 0);
    for (const expert_id e : out.row(l)) {
      if (e < empty_slot || (e >= 0 && static_cast<std::size_t>(e) >= experts)) {
        fail(errc::internal, "policy {}: layer {} holds expert id {} (out of range -1..{})", to_string(kind), l, e,
             experts - 1);
      }
      if (e >= 0) seen[static_cast<std::size_t>(e)] = 1;
    }
    if (const auto it = std::find(seen.begin(), seen.end(), 0); it != seen.end()) {
      fail(errc::internal, "policy {}: layer {} has no replica of logical expert {} (a bug in the policy)",
           to_string(kind), l, it - seen.begin());
    }
  }
  return out;
}

}  // namespace

void validate(const rebalance_input& in) {
  const auto layers = in.load.rows();
  const auto experts = static_cast<int>(in.load.cols());
  if (layers == 0) fail(errc::invalid_argument, "load: needs at least one layer");
  if (experts == 0) fail(errc::invalid_argument, "load: needs at least one expert per layer");
  validate_loads(in.load);
  if (in.num_ranks <= 0) fail(errc::invalid_argument, "num_ranks: must be > 0, got {}", in.num_ranks);
  if (in.num_groups <= 0) fail(errc::invalid_argument, "num_groups: must be > 0, got {}", in.num_groups);
  if (in.num_nodes <= 0) fail(errc::invalid_argument, "num_nodes: must be > 0, got {}", in.num_nodes);
  if (in.num_replicas < experts) {
    fail(errc::invalid_argument, "num_replicas: {} is fewer than the {} logical experts", in.num_replicas, experts);
  }
  if (in.num_replicas % in.num_ranks != 0) {
    fail(errc::invalid_argument, "num_replicas: {} is not divisible by num_ranks {}", in.num_replicas, in.num_ranks);
  }
  check_limits(in);                         // before anything sizes its work by the shape
  if (in.num_groups % in.num_nodes == 0) {  // hierarchical
    if (experts % in.num_groups != 0) {
      fail(errc::invalid_argument, "num_groups: {} does not divide the {} logical experts", in.num_groups, experts);
    }
    if (in.num_ranks % in.num_nodes != 0) {
      fail(errc::invalid_argument, "num_nodes: {} does not divide num_ranks {} (hierarchical balancing)", in.num_nodes,
           in.num_ranks);
    }
  }
  if (in.old_phy2log != nullptr) {
    const auto& old = *in.old_phy2log;
    if (old.rows() != layers || old.cols() != static_cast<std::size_t>(in.num_replicas)) {
      fail(errc::invalid_argument, "old_phy2log: shape {}x{} does not match layers x num_replicas = {}x{}", old.rows(),
           old.cols(), layers, in.num_replicas);
    }
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::size_t p = 0; p < old.cols(); ++p) {
        if (old(l, p) < empty_slot || old(l, p) >= experts) {
          fail(errc::invalid_argument, "old_phy2log[{}][{}]: expert id {} is out of range (-1..{})", l, p, old(l, p),
               experts - 1);
        }
      }
    }
  }
}

void check_limits(const rebalance_input& in) {
  const auto layers = static_cast<std::int64_t>(in.load.rows());
  const auto experts = static_cast<std::int64_t>(in.load.cols());
  const std::int64_t slots = in.num_replicas;
  if (in.num_ranks > max_ranks) {
    fail(errc::invalid_argument, "num_ranks: {} is over the limit of {} ranks (eplb::max_ranks)", in.num_ranks,
         max_ranks);
  }
  if (slots > max_slots_per_layer) {
    fail(errc::invalid_argument, "num_replicas: {} is over the limit of {} slots per layer (eplb::max_slots_per_layer)",
         slots, max_slots_per_layer);
  }
  if (layers > max_layers) {
    fail(errc::invalid_argument, "load: {} layers are over the limit of {} (eplb::max_layers)", layers, max_layers);
  }
  if (layers * slots > max_total_slots) {
    fail(errc::invalid_argument,
         "num_replicas: {} layers x {} slots = {} slots, over the limit of {} (eplb::max_total_slots)", layers, slots,
         layers * slots, max_total_slots);
  }
  // The state allocates log2phy for the most replicas one expert can get, and a skewed load does
  // give one expert all the extra slots: bound that worst case, not the typical one.
  const std::int64_t widest = std::max<std::int64_t>(1, slots - experts + 1);
  if (layers * experts * widest > max_log2phy_entries) {
    fail(errc::invalid_argument,
         "num_replicas: log2phy for {} layers x {} experts x {} replicas (the most one expert can get) has {} entries, "
         "over the limit of {} (eplb::max_log2phy_entries)",
         layers, experts, widest, layers * experts * widest, max_log2phy_entries);
  }
}

matrix<expert_id> rebalance_default(const rebalance_input& in) {
  check_limits(in);
  validate(in);
  const auto layers = in.load.rows();
  const auto experts = static_cast<int>(in.load.cols());
  const bool hierarchical = in.num_groups % in.num_nodes == 0;
  hierarchical_layer h(experts, hierarchical ? in.num_groups : 1, hierarchical ? in.num_nodes : 1, in.num_ranks,
                       in.num_replicas);
  matrix<expert_id> out(layers, static_cast<std::size_t>(in.num_replicas));
  std::vector<float> w32(static_cast<std::size_t>(experts));
  detail::preserve_scratch preserve;
  for (std::size_t l = 0; l < layers; ++l) {
    const auto src = in.load.row(l);
    // -0.0 becomes +0.0 so that bit patterns order like values (see heavier_first_key).
    std::transform(src.begin(), src.end(), w32.begin(),
                   [](double v) { return v == 0.0 ? 0.0F : static_cast<float>(v); });
    h.run(w32, out.row(l));
    if (in.old_phy2log != nullptr) {
      detail::preserve_rank_slots(out.row(l), in.old_phy2log->row(l), in.num_ranks, preserve);
    }
  }
  return out;
}

// The slots of experts no slot of `holders` holds are emptied: no slot could receive their bytes.
void keep_masked_out(matrix<expert_id>& next, const matrix<expert_id>& holders, int num_logical) {
  if (holders.rows() != next.rows()) {
    fail(errc::invalid_argument, "keep_masked_out: {} layers planned, {} held", next.rows(), holders.rows());
  }
  std::vector<char> present(static_cast<std::size_t>(num_logical));
  for (std::size_t l = 0; l < next.rows(); ++l) {
    std::fill(present.begin(), present.end(), 0);
    for (const expert_id e : holders.row(l)) {
      if (e >= 0 && e < num_logical) present[static_cast<std::size_t>(e)] = 1;
    }
    for (expert_id& e : next.row(l)) {
      if (e >= 0 && e < num_logical && !present[static_cast<std::size_t>(e)]) e = empty_slot;
    }
  }
}

matrix<expert_id> rebalance(policy_kind kind, const rebalance_input& in) {
  switch (kind) {
    case policy_kind::deepseek_default:
      return every_expert_placed(kind, in, rebalance_default(in));
    case policy_kind::min_move:
      return every_expert_placed(kind, in, rebalance_min_move(in));
  }
  fail(errc::internal, "rebalance: unhandled policy kind {}", static_cast<int>(kind));
}

}  // namespace eplb

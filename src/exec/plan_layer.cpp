// plan_layer(): one rank's transfers for one layer (which slots keep, copy locally, receive or
// duplicate; which experts it sends to whom), identical on every rank for the same rows.
#include <algorithm>

#include "eplb/exec/plan.hpp"
#include "exec/layer_transfer.hpp"
#include "util/fail.hpp"

namespace eplb::exec {
namespace {

// Ranks holding each expert in a row, ascending and unique.
std::vector<std::vector<int>> holders(std::span<const expert_id> row, int num_ranks, int num_logical) {
  const int slots = static_cast<int>(row.size()) / num_ranks;
  std::vector<std::vector<int>> out(static_cast<std::size_t>(num_logical));
  for (int p = 0; p < static_cast<int>(row.size()); ++p) {
    const expert_id e = row[p];
    if (e < 0) continue;
    auto& h = out[static_cast<std::size_t>(e)];
    const int r = p / slots;
    if (h.empty() || h.back() != r) h.push_back(r);
  }
  return out;
}

int max_expert(std::span<const expert_id> a, std::span<const expert_id> b) {
  expert_id m = -1;
  for (auto e : a) m = std::max(m, e);
  for (auto e : b) m = std::max(m, e);
  return m + 1;
}

int index_of(std::span<const int> v, int x) {
  const auto it = std::lower_bound(v.begin(), v.end(), x);
  return it != v.end() && *it == x ? static_cast<int>(it - v.begin()) : -1;
}

void check_rows(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks, int rank) {
  if (old_row.size() != new_row.size()) {
    fail(errc::invalid_map, "plan_layer: old row has {} slots, new row {}", old_row.size(), new_row.size());
  }
  if (num_ranks <= 0 || old_row.size() % static_cast<std::size_t>(num_ranks) != 0) {
    fail(errc::invalid_map, "plan_layer: {} slots are not divisible by {} ranks", old_row.size(), num_ranks);
  }
  if (rank < 0 || rank >= num_ranks) fail(errc::invalid_argument, "plan_layer: rank {} out of range", rank);
}

// The first local slot holding `e` in the old row, or -1.
int first_old(const layer_plan& p, expert_id e) {
  for (int s = 0; s < p.slots; ++s) {
    if (p.old_local[static_cast<std::size_t>(s)] == e) return s;
  }
  return -1;
}

using primaries = std::vector<std::pair<expert_id, int>>;  // (expert, its primary slot), in slot order

int primary_slot(const primaries& ps, expert_id e) {
  const auto it = std::find_if(ps.begin(), ps.end(), [&](const auto& x) { return x.first == e; });
  return it == ps.end() ? -1 : it->second;
}

// The local half: each slot keeps its expert, copies it from an old local slot, receives it (the
// first slot wanting an expert no local slot holds) or duplicates that first slot.
primaries classify_slots(layer_plan& p) {
  primaries out;
  for (int s = 0; s < p.slots; ++s) {
    const auto u = static_cast<std::size_t>(s);
    const expert_id e = p.new_local[u];
    if (p.old_local[u] == e) {
      p.unchanged[u] = 1;
      continue;
    }
    if (e < 0) continue;  // becomes an empty slot: nothing to write
    if (const int src = first_old(p, e); src >= 0) {
      p.from_local[u] = 1;
      p.local_source[u] = src;
    } else if (const int first = primary_slot(out, e); first < 0) {
      p.primary[u] = 1;
      out.emplace_back(e, s);
    } else {
      p.primary_of[u] = first;
    }
  }
  return out;
}

// The one pairing rule of the wire: for each expert, the ranks that want it and lack it (its
// receivers, in rank order) are split over the ranks that hold it (its senders) in blocks, the
// remainder round-robin. Calls fn(expert, senders, receivers, sender_of) per expert with
// receivers, where sender_of(j) is receiver j's sender; senders may be empty (the caller decides).
template <typename Fn>
void for_each_pairing(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks, Fn fn) {
  const int num_logical = max_expert(old_row, new_row);
  const auto old_holders = holders(old_row, num_ranks, num_logical);
  const auto new_holders = holders(new_row, num_ranks, num_logical);
  std::vector<int> receivers;
  for (expert_id e = 0; e < num_logical; ++e) {
    const auto& senders = old_holders[static_cast<std::size_t>(e)];
    receivers.clear();
    for (int r : new_holders[static_cast<std::size_t>(e)]) {
      if (index_of(senders, r) < 0) receivers.push_back(r);
    }
    if (receivers.empty()) continue;
    const int ns = static_cast<int>(senders.size());
    const int block = ns == 0 ? 0 : static_cast<int>(receivers.size()) / ns;
    const auto sender_of = [&senders, ns, block](int j) {
      return j < ns * block ? senders[j / block] : senders[j - ns * block];
    };
    fn(e, std::span<const int>(senders), std::span<const int>(receivers), sender_of);
  }
}

// The wire half: this rank keeps the pairs it is part of.
void add_transfers(layer_plan& p, std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                   const primaries& prims) {
  for_each_pairing(old_row, new_row, num_ranks, [&](expert_id e, auto senders, auto receivers, auto sender_of) {
    if (senders.empty()) {
      fail(errc::invalid_map, "plan_layer: expert {} is wanted by rank {} but no rank holds it in the old map", e,
           receivers.front());
    }
    if (index_of(senders, p.rank) >= 0) {
      const int src = first_old(p, e);
      for (std::size_t j = 0; j < receivers.size(); ++j) {
        if (sender_of(static_cast<int>(j)) == p.rank) p.sends.push_back({e, receivers[j], src});
      }
    }
    if (const int j = index_of(receivers, p.rank); j >= 0) p.recvs.push_back({e, sender_of(j), primary_slot(prims, e)});
  });
}

}  // namespace

// add_transfers()'s pairing, for every sender at once.
std::vector<std::size_t> pair_sends(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                    int num_ranks) {
  check_rows(old_row, new_row, num_ranks, 0);
  const auto n = static_cast<std::size_t>(num_ranks);
  std::vector<std::size_t> out(n * n, 0);
  for_each_pairing(old_row, new_row, num_ranks, [&](expert_id, auto senders, auto receivers, auto sender_of) {
    if (senders.empty()) return;  // plan_layer() refuses it
    for (std::size_t j = 0; j < receivers.size(); ++j) {
      ++out[static_cast<std::size_t>(sender_of(static_cast<int>(j))) * n + static_cast<std::size_t>(receivers[j])];
    }
  });
  return out;
}

expert_id layer_plan::read_until(int slot) const {
  const bool source = std::any_of(sends.begin(), sends.end(), [&](const transfer& t) { return t.slot == slot; }) ||
                      std::find(local_source.begin(), local_source.end(), slot) != local_source.end();
  return source ? old_local[static_cast<std::size_t>(slot)] : -1;
}

std::vector<int> layer_plan::buffer_slots() const {
  std::vector<int> out;
  for (int s = 0; s < slots; ++s) {
    if (from_local[s] || primary[s]) out.push_back(s);
  }
  return out;
}

bool layer_plan::is_noop() const {
  return sends.empty() && recvs.empty() && std::all_of(unchanged.begin(), unchanged.end(), [](char c) { return c; });
}

layer_plan plan_layer(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks, int rank) {
  check_rows(old_row, new_row, num_ranks, rank);
  layer_plan p;
  p.rank = rank;
  p.slots = static_cast<int>(old_row.size()) / num_ranks;
  const auto base = static_cast<std::ptrdiff_t>(rank) * p.slots;
  p.old_local.assign(old_row.begin() + base, old_row.begin() + base + p.slots);
  p.new_local.assign(new_row.begin() + base, new_row.begin() + base + p.slots);
  const auto n = static_cast<std::size_t>(p.slots);
  p.unchanged.assign(n, 0);
  p.from_local.assign(n, 0);
  p.primary.assign(n, 0);
  p.local_source.assign(n, -1);
  p.primary_of.assign(n, -1);
  const auto prims = classify_slots(p);
  add_transfers(p, old_row, new_row, num_ranks, prims);
  return p;
}

}  // namespace eplb::exec

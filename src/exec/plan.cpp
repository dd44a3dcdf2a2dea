#include "eplb/exec/plan.hpp"

#include <algorithm>

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

int index_of(const std::vector<int>& v, int x) {
  const auto it = std::lower_bound(v.begin(), v.end(), x);
  return it != v.end() && *it == x ? static_cast<int>(it - v.begin()) : -1;
}

}  // namespace

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
  if (old_row.size() != new_row.size()) {
    fail(errc::invalid_map, "plan_layer: old row has {} slots, new row {}", old_row.size(), new_row.size());
  }
  if (num_ranks <= 0 || old_row.size() % static_cast<std::size_t>(num_ranks) != 0) {
    fail(errc::invalid_map, "plan_layer: {} slots are not divisible by {} ranks", old_row.size(), num_ranks);
  }
  if (rank < 0 || rank >= num_ranks) fail(errc::invalid_argument, "plan_layer: rank {} out of range", rank);
  layer_plan p;
  p.rank = rank;
  p.slots = static_cast<int>(old_row.size()) / num_ranks;
  const auto base = static_cast<std::size_t>(rank * p.slots);
  p.old_local.assign(old_row.begin() + static_cast<std::ptrdiff_t>(base),
                     old_row.begin() + static_cast<std::ptrdiff_t>(base) + p.slots);
  p.new_local.assign(new_row.begin() + static_cast<std::ptrdiff_t>(base),
                     new_row.begin() + static_cast<std::ptrdiff_t>(base) + p.slots);
  const auto n = static_cast<std::size_t>(p.slots);
  p.unchanged.assign(n, 0);
  p.from_local.assign(n, 0);
  p.primary.assign(n, 0);
  p.local_source.assign(n, -1);
  p.primary_of.assign(n, -1);

  const auto first_old = [&](expert_id e) {
    for (int s = 0; s < p.slots; ++s) {
      if (p.old_local[s] == e) return s;
    }
    return -1;
  };
  std::vector<std::pair<expert_id, int>> primaries;  // (expert, slot), in slot order
  for (int s = 0; s < p.slots; ++s) {
    const expert_id e = p.new_local[s];
    if (p.old_local[s] == e) {
      p.unchanged[s] = 1;
      continue;
    }
    if (e < 0) continue;  // becomes an empty slot: nothing to write
    if (const int src = first_old(e); src >= 0) {
      p.from_local[s] = 1;
      p.local_source[s] = src;
      continue;
    }
    const auto it = std::find_if(primaries.begin(), primaries.end(), [&](const auto& x) { return x.first == e; });
    if (it == primaries.end()) {
      p.primary[s] = 1;
      primaries.emplace_back(e, s);
    } else {
      p.primary_of[s] = it->second;
    }
  }

  const int num_logical = max_expert(old_row, new_row);
  const auto old_holders = holders(old_row, num_ranks, num_logical);
  const auto new_holders = holders(new_row, num_ranks, num_logical);
  for (expert_id e = 0; e < num_logical; ++e) {
    const auto& senders = old_holders[static_cast<std::size_t>(e)];
    std::vector<int> receivers;
    for (int r : new_holders[static_cast<std::size_t>(e)]) {
      if (index_of(senders, r) < 0) receivers.push_back(r);
    }
    if (receivers.empty()) continue;
    if (senders.empty()) {
      fail(errc::invalid_map, "plan_layer: expert {} is wanted by rank {} but no rank holds it in the old map", e,
           receivers.front());
    }
    const int ns = static_cast<int>(senders.size());
    const int nr = static_cast<int>(receivers.size());
    const int block = nr / ns;
    if (const int i = index_of(senders, rank); i >= 0) {
      const int src = first_old(e);
      for (int k = i * block; k < (i + 1) * block; ++k) p.sends.push_back({e, receivers[k], src});
      if (ns * block + i < nr) p.sends.push_back({e, receivers[ns * block + i], src});
    }
    if (const int j = index_of(receivers, rank); j >= 0) {
      const int from = j < ns * block ? senders[j / block] : senders[j - ns * block];
      const auto it = std::find_if(primaries.begin(), primaries.end(), [&](const auto& x) { return x.first == e; });
      p.recvs.push_back({e, from, it->second});
    }
  }
  return p;
}

int chunk_plan::chunk_of(expert_id e) const {
  const int pos = position[static_cast<std::size_t>(e)];
  for (std::size_t c = 0; c < ranges.size(); ++c) {
    if (pos >= ranges[c].first && pos < ranges[c].second) return static_cast<int>(c);
  }
  return -1;
}

chunk_plan plan_chunks(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                       int num_logical, std::size_t buffer_rows, int layer) {
  // Per rank and staging row: the expert it stages (y) and the experts whose batches must be done
  // before the row is released (the old experts its target slots are still read as).
  struct staged_row {
    expert_id y;
    std::vector<expert_id> waits;
  };
  std::vector<std::vector<staged_row>> rows(static_cast<std::size_t>(num_ranks));
  // X -> Y: slot read as X is rewritten with Y; X should come first.
  std::vector<std::vector<expert_id>> before(static_cast<std::size_t>(num_logical));
  for (int r = 0; r < num_ranks; ++r) {
    const auto p = plan_layer(old_row, new_row, num_ranks, r);
    for (int s : p.buffer_slots()) {
      staged_row row{p.new_local[static_cast<std::size_t>(s)], {}};
      for (int d = 0; d < p.slots; ++d) {
        if (d != s && p.primary_of[static_cast<std::size_t>(d)] != s) continue;
        const expert_id x = p.read_until(d);
        if (x >= 0 && x != row.y) {
          row.waits.push_back(x);
          before[static_cast<std::size_t>(row.y)].push_back(x);
        }
      }
      rows[static_cast<std::size_t>(r)].push_back(std::move(row));
    }
  }
  // Kahn's order, lowest id first; on a cycle, the lowest id among the fewest unmet dependencies.
  chunk_plan out;
  out.position.assign(static_cast<std::size_t>(num_logical), -1);
  std::vector<int> unmet(static_cast<std::size_t>(num_logical), 0);
  std::vector<std::vector<expert_id>> after(static_cast<std::size_t>(num_logical));
  for (expert_id y = 0; y < num_logical; ++y) {
    for (expert_id x : before[static_cast<std::size_t>(y)]) {
      ++unmet[static_cast<std::size_t>(y)];
      after[static_cast<std::size_t>(x)].push_back(y);
    }
  }
  for (int placed = 0; placed < num_logical; ++placed) {
    expert_id pick = -1;
    for (expert_id e = 0; e < num_logical; ++e) {
      if (out.position[static_cast<std::size_t>(e)] >= 0) continue;
      if (pick < 0 || unmet[static_cast<std::size_t>(e)] < unmet[static_cast<std::size_t>(pick)]) pick = e;
      if (unmet[static_cast<std::size_t>(pick)] == 0) break;
    }
    out.position[static_cast<std::size_t>(pick)] = placed;
    for (expert_id y : after[static_cast<std::size_t>(pick)]) --unmet[static_cast<std::size_t>(y)];
  }
  // Greedy cut: extend the current range while every rank's rows in use fit.
  const auto rows_in_use = [&](int lo, int hi) {
    std::size_t worst = 0;
    for (const auto& rank_rows : rows) {
      std::size_t used = 0;
      for (const auto& row : rank_rows) {
        const int py = out.position[static_cast<std::size_t>(row.y)];
        int release = py;
        for (expert_id x : row.waits) release = std::max(release, out.position[static_cast<std::size_t>(x)]);
        used += py < hi && release >= lo;
      }
      worst = std::max(worst, used);
    }
    return worst;
  };
  for (int lo = 0; lo < num_logical;) {
    if (const auto need = rows_in_use(lo, lo + 1); need > buffer_rows) {
      fail(errc::invalid_argument,
           "staging_bytes: layer {} needs at least {} staging rows (one expert bundle each) here, the cap allows {}",
           layer, need, buffer_rows);
    }
    int hi = lo + 1;
    while (hi < num_logical && rows_in_use(lo, hi + 1) <= buffer_rows) ++hi;
    out.ranges.emplace_back(lo, hi);
    lo = hi;
  }
  return out;
}

matrix<expert_id> expand_for_scale_down(const matrix<expert_id>& survivors, std::span<const int> mapping,
                                        int slots_per_rank) {
  const int old_ranks = static_cast<int>(mapping.size());
  int new_ranks = 0;
  for (int r : mapping) new_ranks += r >= 0;
  if (survivors.cols() != static_cast<std::size_t>(new_ranks * slots_per_rank)) {
    fail(errc::invalid_map, "scale-down: survivor placement has {} slots, {} surviving ranks x {} slots expected",
         survivors.cols(), new_ranks, slots_per_rank);
  }
  matrix<expert_id> out(survivors.rows(), static_cast<std::size_t>(old_ranks * slots_per_rank), empty_slot);
  for (int r = 0; r < old_ranks; ++r) {
    const int nr = mapping[static_cast<std::size_t>(r)];
    if (nr < -1 || nr >= new_ranks)
      fail(errc::invalid_map, "rank_mapping[{}] = {} is out of range -1..{}", r, nr, new_ranks - 1);
    if (nr < 0) continue;
    for (std::size_t l = 0; l < survivors.rows(); ++l) {
      for (int s = 0; s < slots_per_rank; ++s) out(l, r * slots_per_rank + s) = survivors(l, nr * slots_per_rank + s);
    }
  }
  return out;
}

matrix<expert_id> expand_for_scale_up(const matrix<expert_id>& old_map, std::span<const int> mapping, int new_ranks,
                                      int slots_per_rank) {
  const int old_ranks = static_cast<int>(mapping.size());
  if (old_map.cols() != static_cast<std::size_t>(old_ranks * slots_per_rank)) {
    fail(errc::invalid_map, "scale-up: old placement has {} slots, {} ranks x {} slots expected", old_map.cols(),
         old_ranks, slots_per_rank);
  }
  matrix<expert_id> out(old_map.rows(), static_cast<std::size_t>(new_ranks * slots_per_rank), empty_slot);
  for (int r = 0; r < old_ranks; ++r) {
    const int nr = mapping[static_cast<std::size_t>(r)];
    if (nr < 0 || nr >= new_ranks)
      fail(errc::invalid_map, "rank_mapping[{}] = {} is out of range 0..{}", r, nr, new_ranks - 1);
    for (std::size_t l = 0; l < old_map.rows(); ++l) {
      for (int s = 0; s < slots_per_rank; ++s) out(l, nr * slots_per_rank + s) = old_map(l, r * slots_per_rank + s);
    }
  }
  return out;
}

int write_ready_after(const layer_plan& plan, const chunk_plan& chunks, int slot) {
  const auto s = static_cast<std::size_t>(slot);
  if (!plan.from_local[s] && !plan.primary[s] && plan.primary_of[s] < 0) return -1;
  int ready = chunks.position[static_cast<std::size_t>(plan.new_local[s])];
  if (const expert_id x = plan.read_until(slot); x >= 0)
    ready = std::max(ready, chunks.position[static_cast<std::size_t>(x)]);
  return ready;
}

std::vector<expert_id> row_after_chunks(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                        int num_ranks, const chunk_plan& chunks, int done) {
  std::vector<expert_id> row(old_row.begin(), old_row.end());
  if (done <= 0) return row;
  const int written_before = chunks.ranges[static_cast<std::size_t>(done - 1)].second;
  for (int q = 0; q < num_ranks; ++q) {
    const auto plan = plan_layer(old_row, new_row, num_ranks, q);
    for (int s = 0; s < plan.slots; ++s) {
      const int ready = write_ready_after(plan, chunks, s);
      if (ready >= 0 && ready < written_before) {
        const auto p = static_cast<std::size_t>(q * plan.slots + s);
        row[p] = new_row[p];
      }
    }
  }
  return row;
}

}  // namespace eplb::exec

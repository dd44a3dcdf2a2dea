// plan_chunks(): the split of a layer into communicator batches when its staging rows do not fit
// the cap, and what a layer holds when every rank stopped after the same chunk.
#include <algorithm>

#include "eplb/exec/plan.hpp"
#include "util/fail.hpp"

namespace eplb::exec {
namespace {

// One staging row of one rank: the expert it stages (y) and the experts whose batches must be done
// before the row is released (the old experts its target slots are still read as).
struct staged_row {
  expert_id y;
  std::vector<expert_id> waits;
};

struct layer_rows {
  std::vector<std::vector<staged_row>> per_rank;
  std::vector<std::vector<expert_id>> before;  // per expert Y: experts X that should come first (X -> Y)
};

layer_rows staged_rows(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                       int num_logical) {
  layer_rows out;
  out.per_rank.resize(static_cast<std::size_t>(num_ranks));
  out.before.resize(static_cast<std::size_t>(num_logical));
  for (int r = 0; r < num_ranks; ++r) {
    const auto p = plan_layer(old_row, new_row, num_ranks, r);
    for (int s : p.buffer_slots()) {
      staged_row row{p.new_local[static_cast<std::size_t>(s)], {}};
      for (int d = 0; d < p.slots; ++d) {
        if (d != s && p.primary_of[static_cast<std::size_t>(d)] != s) continue;
        const expert_id x = p.read_until(d);
        if (x >= 0 && x != row.y) {
          row.waits.push_back(x);
          out.before[static_cast<std::size_t>(row.y)].push_back(x);
        }
      }
      out.per_rank[static_cast<std::size_t>(r)].push_back(std::move(row));
    }
  }
  return out;
}

// Kahn's order, lowest id first; on a cycle, the lowest id among the fewest unmet dependencies.
std::vector<int> order_experts(const std::vector<std::vector<expert_id>>& before, int num_logical) {
  std::vector<int> position(static_cast<std::size_t>(num_logical), -1);
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
      if (position[static_cast<std::size_t>(e)] >= 0) continue;
      if (pick < 0 || unmet[static_cast<std::size_t>(e)] < unmet[static_cast<std::size_t>(pick)]) pick = e;
      if (unmet[static_cast<std::size_t>(pick)] == 0) break;
    }
    position[static_cast<std::size_t>(pick)] = placed;
    for (expert_id y : after[static_cast<std::size_t>(pick)]) --unmet[static_cast<std::size_t>(y)];
  }
  return position;
}

// The most staging rows any rank has in use while positions [lo, hi) are one batch.
std::size_t rows_in_use(const layer_rows& rows, const std::vector<int>& position, int lo, int hi) {
  std::size_t worst = 0;
  for (const auto& rank_rows : rows.per_rank) {
    std::size_t used = 0;
    for (const auto& row : rank_rows) {
      const int py = position[static_cast<std::size_t>(row.y)];
      int release = py;
      for (expert_id x : row.waits) release = std::max(release, position[static_cast<std::size_t>(x)]);
      used += py < hi && release >= lo;
    }
    worst = std::max(worst, used);
  }
  return worst;
}

}  // namespace

int chunk_plan::chunk_of(expert_id e) const {
  const int pos = position[static_cast<std::size_t>(e)];
  for (std::size_t c = 0; c < ranges.size(); ++c) {
    if (pos >= ranges[c].first && pos < ranges[c].second) return static_cast<int>(c);
  }
  return -1;
}

chunk_plan plan_chunks(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                       int num_logical, std::size_t buffer_rows, int layer) {
  const auto rows = staged_rows(old_row, new_row, num_ranks, num_logical);
  chunk_plan out;
  out.position = order_experts(rows.before, num_logical);
  // Greedy cut: extend the current range while every rank's rows in use fit.
  for (int lo = 0; lo < num_logical;) {
    if (const auto need = rows_in_use(rows, out.position, lo, lo + 1); need > buffer_rows) {
      fail(errc::invalid_argument,
           "staging_bytes: layer {} needs at least {} staging rows (one expert bundle each) here, the cap allows {}",
           layer, need, buffer_rows);
    }
    int hi = lo + 1;
    while (hi < num_logical && rows_in_use(rows, out.position, lo, hi + 1) <= buffer_rows) ++hi;
    out.ranges.emplace_back(lo, hi);
    lo = hi;
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

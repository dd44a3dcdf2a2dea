// plan_chunks(): the split of a layer into communicator batches when its staging rows do not fit
// the cap, and what a layer holds when every rank stopped after the same chunk (the commit vote
// refused the next one), including the staging rows written back so that every expert keeps a
// live slot.
#include <algorithm>
#include <optional>

#include "eplb/exec/plan.hpp"
#include "util/fail.hpp"

namespace eplb::exec {
namespace {

// The local slots a staging row is written to: its own slot and the slots duplicating it.
template <typename Fn>
void for_each_target(const layer_plan& p, int staged, Fn fn) {
  for (int d = 0; d < p.slots; ++d) {
    if (d == staged || p.primary_of[static_cast<std::size_t>(d)] == staged) fn(d);
  }
}

// Per expert Y, the experts X that should come first: a slot still read as X is rewritten with Y.
std::vector<std::vector<expert_id>> read_before_write(const std::vector<layer_plan>& plans, int num_logical) {
  std::vector<std::vector<expert_id>> before(static_cast<std::size_t>(num_logical));
  for (const auto& p : plans) {
    for (int s : p.buffer_slots()) {
      const expert_id y = p.new_local[static_cast<std::size_t>(s)];
      for_each_target(p, s, [&](int d) {
        if (const expert_id x = p.read_until(d); x >= 0 && x != y) before[static_cast<std::size_t>(y)].push_back(x);
      });
    }
  }
  return before;
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

// When a changed slot may be written: once its new expert is staged and its old one, if still
// read, was sent (-1: the slot is not written).
int base_ready(const layer_plan& p, const std::vector<int>& position, int slot) {
  const auto s = static_cast<std::size_t>(slot);
  if (!p.from_local[s] && !p.primary[s] && p.primary_of[s] < 0) return -1;
  int ready = position[static_cast<std::size_t>(p.new_local[s])];
  if (const expert_id x = p.read_until(slot); x >= 0) ready = std::max(ready, position[static_cast<std::size_t>(x)]);
  return ready;
}

// One staging row of one rank: the buffer slot it is for, its expert, and the positions it is
// staged at and released after (its last write).
struct staged_row {
  int slot;
  expert_id expert;
  int stage;
  int release;
};

// Everything every rank derives alike about one layer's chunked move.
struct layer_schedule {
  std::span<const expert_id> old_row, new_row;
  int num_logical = 0;
  std::vector<layer_plan> plans;               // per rank
  const std::vector<int>* position = nullptr;  // the chunk order
  std::vector<std::vector<staged_row>> rows;   // per rank
};

layer_schedule make_schedule(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                             int num_logical) {
  layer_schedule out{.old_row = old_row, .new_row = new_row, .num_logical = num_logical};
  out.plans.reserve(static_cast<std::size_t>(num_ranks));
  for (int r = 0; r < num_ranks; ++r) out.plans.push_back(plan_layer(old_row, new_row, num_ranks, r));
  return out;
}

void add_rows(layer_schedule& s, const chunk_plan& chunks) {
  s.position = &chunks.position;
  s.rows.assign(s.plans.size(), {});
  for (const auto& p : s.plans) {
    for (int b : p.buffer_slots()) {
      const expert_id y = p.new_local[static_cast<std::size_t>(b)];
      staged_row row{b, y, chunks.position[static_cast<std::size_t>(y)], 0};
      row.release = row.stage;
      for_each_target(p, b, [&](int d) { row.release = std::max(row.release, base_ready(p, chunks.position, d)); });
      s.rows[static_cast<std::size_t>(p.rank)].push_back(row);
    }
  }
}

// The most staging rows any rank has in use while positions [lo, hi) are one batch.
std::size_t rows_in_use(const layer_schedule& s, int lo, int hi) {
  std::size_t worst = 0;
  for (const auto& rank_rows : s.rows) {
    std::size_t used = 0;
    for (const auto& row : rank_rows) used += row.stage < hi && row.release >= lo;
    worst = std::max(worst, used);
  }
  return worst;
}

// Writes a staging row of `e` still held at the stop into a slot of the same rank that the maps
// leave empty or whose expert has another copy. False when no rank holding `e` has such a slot.
bool write_back(const layer_schedule& s, int hi, expert_id e, stopped_layer& out, std::vector<int>& copies) {
  for (const auto& p : s.plans) {
    for (const auto& row : s.rows[static_cast<std::size_t>(p.rank)]) {
      if (row.expert != e || row.stage >= hi || row.release < hi) continue;  // not held at the stop
      for (int x = 0; x < p.slots; ++x) {
        auto& now = out.row[static_cast<std::size_t>(p.rank * p.slots + x)];
        if (now >= 0 && copies[static_cast<std::size_t>(now)] < 2) continue;
        if (now >= 0) --copies[static_cast<std::size_t>(now)];
        now = e;
        ++copies[static_cast<std::size_t>(e)];
        out.repairs.push_back({p.rank, x, row.slot});
        return true;
      }
    }
  }
  return false;
}

// The layer once every rank wrote the chunks before position `hi` and stopped: a slot holds its new
// expert where its write happened, else its old one; an expert left only in staging rows is
// written back (write_back). False when some expert cannot be.
bool stop_at(const layer_schedule& s, int hi, stopped_layer& out) {
  out.row.assign(s.old_row.begin(), s.old_row.end());
  out.repairs.clear();
  for (const auto& p : s.plans) {
    for (int x = 0; x < p.slots; ++x) {
      const int ready = base_ready(p, *s.position, x);
      const auto g = static_cast<std::size_t>(p.rank * p.slots + x);
      if (ready >= 0 && ready < hi) out.row[g] = s.new_row[g];
    }
  }
  std::vector<int> copies(static_cast<std::size_t>(s.num_logical), 0);
  for (const expert_id e : out.row) {
    if (e >= 0) ++copies[static_cast<std::size_t>(e)];  // -1: an empty slot
  }
  for (expert_id e = 0; e < s.num_logical; ++e) {
    if (copies[static_cast<std::size_t>(e)] == 0 && !write_back(s, hi, e, out, copies)) return false;
  }
  return true;
}

// Where the chunk starting at `lo` ends: the last position up to `hi` (the most the cap allows)
// where a stop leaves every expert a slot, else the first such position past `hi`, whose rows must
// still fit the cap (-1 when they do not).
int safe_end(const layer_schedule& s, int lo, int hi, std::size_t buffer_rows) {
  stopped_layer scratch;
  const auto safe = [&](int h) { return h == s.num_logical || stop_at(s, h, scratch); };
  for (int h = hi; h > lo; --h) {
    if (safe(h)) return h;
  }
  int h = hi + 1;
  while (!safe(h)) ++h;
  return rows_in_use(s, lo, h) > buffer_rows ? -1 : h;
}

// The expert-order plan, or nullopt when some chunk needs more rows than the cap.
std::optional<chunk_plan> plan_by_expert(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                         int num_ranks, int num_logical, std::size_t buffer_rows, cut_rule rule) {
  auto s = make_schedule(old_row, new_row, num_ranks, num_logical);
  chunk_plan out;
  out.position = order_experts(read_before_write(s.plans, num_logical), num_logical);
  add_rows(s, out);
  // Greedy cut: extend the current range while every rank's rows in use fit, then, if the rule
  // says so, back off to where a stop keeps every expert in a live slot.
  for (int lo = 0; lo < num_logical;) {
    if (rows_in_use(s, lo, lo + 1) > buffer_rows) return std::nullopt;
    int hi = lo + 1;
    while (hi < num_logical && rows_in_use(s, lo, hi + 1) <= buffer_rows) ++hi;
    if (rule == cut_rule::stop_safe && (hi = safe_end(s, lo, hi, buffer_rows)) < 0) return std::nullopt;
    out.ranges.emplace_back(lo, hi);
    lo = hi;
  }
  return out;
}

// The serial plan; under stop_safe every stop must leave every expert a slot (one break per cycle,
// which a stop can still leave only in a row on a rank without a spare slot: then refused).
chunk_plan plan_by_slot(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                        int num_logical, std::size_t buffer_rows, int layer, cut_rule rule) {
  chunk_plan out;
  out.serial = rule == cut_rule::anywhere
                   ? plan_serial(old_row, new_row, num_ranks, num_logical, buffer_rows, true)
                   : plan_serial_stop_safe(old_row, new_row, num_ranks, num_logical, buffer_rows);
  if (!out.serial) {
    fail(errc::invalid_argument,
         "staging_bytes: layer {} cannot be moved with {} staging rows (one expert bundle each) so that a failed "
         "batch leaves every expert a slot",
         layer, buffer_rows);
  }
  for (int c = 0; c < static_cast<int>(out.serial->chunks.size()); ++c) out.ranges.emplace_back(c, c + 1);
  return out;
}

}  // namespace

int chunk_plan::chunk_of(expert_id e) const {
  if (position.empty()) return -1;  // a serial schedule moves an expert in any of its chunks
  const int pos = position[static_cast<std::size_t>(e)];
  for (std::size_t c = 0; c < ranges.size(); ++c) {
    if (pos >= ranges[c].first && pos < ranges[c].second) return static_cast<int>(c);
  }
  return -1;
}

chunk_plan plan_chunks(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                       int num_logical, std::size_t buffer_rows, int layer, cut_rule rule) {
  if (buffer_rows == 0) {
    fail(errc::invalid_argument, "staging_bytes: layer {} needs at least 1 staging row (one expert bundle)", layer);
  }
  if (auto out = plan_by_expert(old_row, new_row, num_ranks, num_logical, buffer_rows, rule)) return std::move(*out);
  return plan_by_slot(old_row, new_row, num_ranks, num_logical, buffer_rows, layer, rule);
}

int write_ready_after(const layer_plan& plan, const chunk_plan& chunks, int slot) {
  return base_ready(plan, chunks.position, slot);
}

stopped_layer stop_after_chunks(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                                int num_logical, const chunk_plan& chunks, int done) {
  if (chunks.serial) {
    auto stop = serial_stop(*chunks.serial, old_row, num_ranks, done);
    if (!stop) fail(errc::internal, "plan_serial: a stop after chunk {} loses an expert", done);
    return std::move(*stop);
  }
  if (done <= 0) return {{old_row.begin(), old_row.end()}, {}};
  auto s = make_schedule(old_row, new_row, num_ranks, num_logical);
  add_rows(s, chunks);
  stopped_layer out;
  const int hi = chunks.ranges[static_cast<std::size_t>(done - 1)].second;
  if (!stop_at(s, hi, out)) fail(errc::internal, "plan_chunks: a stop after chunk {} loses an expert", done);
  return out;
}

std::vector<expert_id> row_after_chunks(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                        int num_ranks, const chunk_plan& chunks, int done) {
  const int num_logical = chunks.serial ? chunks.serial->num_logical : static_cast<int>(chunks.position.size());
  return stop_after_chunks(old_row, new_row, num_ranks, num_logical, chunks, done).row;
}

}  // namespace eplb::exec

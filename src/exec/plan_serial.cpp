// plan_serial(): a layer's move for any staging cap of at least one row per rank. Every changed slot
// reads its new expert from one provider slot (a peer's or its own rank's), so the slots form a
// graph where each has at most one provider: trees, whose slots are written leaves first, straight
// into the slot once nothing reads its old bytes, and cycles. A cycle is broken by saving one of its
// slots into a staging row: that slot is then free to be written, its reader takes the row, and the
// cycle unwinds one slot per batch (or per local copy). When nothing is ready no row is held (a
// saved cycle always has a ready slot until it is done), so one row per rank always suffices.
#include <algorithm>
#include <optional>
#include <utility>

#include "eplb/exec/plan.hpp"
#include "util/fail.hpp"

namespace eplb::exec {
namespace {

enum class slot_kind { keep, empty, local, remote, dup };

struct slot_state {
  int rank = 0, slot = 0;
  expert_id old_e = -1, new_e = -1;
  slot_kind kind = slot_kind::keep;
  int provider = -1;  // global slot read (local, remote), or the primary copied (dup)
  int pending = 0;    // readers of the old bytes not written yet
  int row = -1;       // staging row holding the old bytes once saved
  int staged = -1;    // staging row its new bytes were received into, written once the slot is free
  bool read = false;  // its provider was read already (a staged slot)
  bool written = false;
};

struct planner {
  int ranks = 0, slots = 0;
  std::size_t rows = 1;
  std::vector<slot_state> s;                // per global slot
  std::vector<std::vector<int>> readers;    // per global slot: the slots reading its old bytes
  std::vector<std::vector<char>> row_busy;  // per rank, per row
  int left = 0;                             // slots still to write
  std::vector<char> avoid;                  // per global slot: saved last when 1
  bool one_cycle = false;                   // at a standstill, save a slot of one cycle only

  [[nodiscard]] bool is_free(const slot_state& x) const { return x.pending == 0 || x.row >= 0; }
  [[nodiscard]] bool ready(const slot_state& x) const {
    if (x.written || !is_free(x)) return false;
    if (x.kind == slot_kind::dup) return s[static_cast<std::size_t>(x.provider)].written;
    return x.kind == slot_kind::local || x.kind == slot_kind::remote;
  }
};

// The slot of `rank` a reader of `e` reads: one that keeps `e` if any (it never changes), else the
// first holding it.
int provider_slot(const planner& pl, int rank, expert_id e) {
  int first = -1;
  for (int x = 0; x < pl.slots; ++x) {
    const auto& st = pl.s[static_cast<std::size_t>(rank * pl.slots + x)];
    if (st.old_e != e) continue;
    if (st.kind == slot_kind::keep) return rank * pl.slots + x;
    if (first < 0) first = rank * pl.slots + x;
  }
  return first;
}

// Kinds and providers: the same receiver/sender pairs as plan_layer, every changed slot of a rank
// that holds its new expert reads it locally, the first slot of a rank wanting a missing expert
// receives it and the rest copy that slot once it is written.
void classify(planner& pl, std::span<const expert_id> old_row, std::span<const expert_id> new_row) {
  for (int g = 0; g < pl.ranks * pl.slots; ++g) {
    auto& x = pl.s[static_cast<std::size_t>(g)];
    x = {.rank = g / pl.slots, .slot = g % pl.slots, .old_e = old_row[g], .new_e = new_row[g]};
    x.kind = x.old_e == x.new_e ? slot_kind::keep : x.new_e < 0 ? slot_kind::empty : slot_kind::local;
  }
  for (int r = 0; r < pl.ranks; ++r) {
    const auto plan = plan_layer(old_row, new_row, pl.ranks, r);
    for (int x = 0; x < pl.slots; ++x) {
      auto& st = pl.s[static_cast<std::size_t>(r * pl.slots + x)];
      if (st.kind != slot_kind::local) continue;
      if (plan.primary_of[static_cast<std::size_t>(x)] >= 0) {
        st.kind = slot_kind::dup;
        st.provider = r * pl.slots + plan.primary_of[static_cast<std::size_t>(x)];
      } else if (plan.primary[static_cast<std::size_t>(x)]) {
        st.kind = slot_kind::remote;
        const auto it =
            std::find_if(plan.recvs.begin(), plan.recvs.end(), [&](const transfer& t) { return t.expert == st.new_e; });
        st.provider = provider_slot(pl, it->peer, st.new_e);
      } else {
        st.provider = provider_slot(pl, r, st.new_e);
      }
    }
  }
  pl.readers.assign(pl.s.size(), {});
  for (int g = 0; g < static_cast<int>(pl.s.size()); ++g) {
    const auto& x = pl.s[static_cast<std::size_t>(g)];
    if (x.kind == slot_kind::local || x.kind == slot_kind::remote) {
      pl.readers[static_cast<std::size_t>(x.provider)].push_back(g);
      ++pl.s[static_cast<std::size_t>(x.provider)].pending;
    }
    pl.left += x.kind == slot_kind::local || x.kind == slot_kind::remote || x.kind == slot_kind::dup ? 1 : 0;
  }
}

// Slot `g` is written: its provider has one reader less, and a saved provider's row is freed once
// nobody reads it.
void mark_written(planner& pl, int g) {
  auto& x = pl.s[static_cast<std::size_t>(g)];
  x.written = true;
  --pl.left;
  if (x.staged >= 0) pl.row_busy[static_cast<std::size_t>(x.rank)][static_cast<std::size_t>(x.staged)] = 0;
  if (x.kind == slot_kind::dup || std::exchange(x.read, true)) return;
  auto& p = pl.s[static_cast<std::size_t>(x.provider)];
  if (--p.pending == 0 && p.row >= 0) {
    pl.row_busy[static_cast<std::size_t>(p.rank)][static_cast<std::size_t>(p.row)] = 0;
  }
}

// Where slot `g`'s new bytes come from: its provider's row once saved, else its slot.
std::pair<int, int> source_of(const planner& pl, const slot_state& x) {
  const auto& p = pl.s[static_cast<std::size_t>(x.provider)];
  if (x.kind != slot_kind::dup && p.row >= 0) return {-1, p.row};
  return {p.slot, -1};
}

// Local copies and duplicates, repeated while any is ready (each may free its provider).
void local_fixpoint(planner& pl, std::vector<serial_copy>& out) {
  for (bool progress = true; progress;) {
    progress = false;
    for (int g = 0; g < static_cast<int>(pl.s.size()); ++g) {
      const auto& x = pl.s[static_cast<std::size_t>(g)];
      if ((x.kind == slot_kind::remote && x.staged < 0) || !pl.ready(x)) continue;
      const auto [from_slot, from_row] = x.staged >= 0 ? std::pair{-1, x.staged} : source_of(pl, x);
      out.push_back({x.rank, from_slot, from_row, x.slot, -1});
      mark_written(pl, g);
      progress = true;
    }
  }
}

// The next batch: every remote slot ready now, written straight from its provider.
std::vector<serial_move> ready_moves(const planner& pl) {
  std::vector<serial_move> out;
  for (const auto& x : pl.s) {
    if (x.kind != slot_kind::remote || x.staged >= 0 || !pl.ready(x)) continue;
    const auto [from_slot, from_row] = source_of(pl, x);
    out.push_back({x.new_e, pl.s[static_cast<std::size_t>(x.provider)].rank, from_slot, from_row, x.rank, x.slot});
  }
  // The wire order of a pair must be the same at both ends: ascending expert, then receiver.
  std::stable_sort(out.begin(), out.end(), [](const serial_move& a, const serial_move& b) {
    return std::tie(a.expert, a.to_rank, a.to_slot) < std::tie(b.expert, b.to_rank, b.to_slot);
  });
  return out;
}

int free_row(const planner& pl, int rank) {
  const auto& busy = pl.row_busy[static_cast<std::size_t>(rank)];
  const auto it = std::find(busy.begin(), busy.end(), 0);
  return it == busy.end() ? -1 : static_cast<int>(it - busy.begin());
}

void save(planner& pl, int g, std::vector<serial_copy>& out) {
  auto& x = pl.s[static_cast<std::size_t>(g)];
  x.row = free_row(pl, x.rank);
  pl.row_busy[static_cast<std::size_t>(x.rank)][static_cast<std::size_t>(x.row)] = 1;
  out.push_back({x.rank, x.slot, -1, -1, x.row});
}

// The cycle of unwritten slots reached from `g` through readers that still wait (at a standstill
// every slot still read lies on one), in reading order.
std::vector<int> cycle_from(const planner& pl, int g) {
  std::vector<int> seen(pl.s.size(), -1), path;
  while (seen[static_cast<std::size_t>(g)] < 0) {
    seen[static_cast<std::size_t>(g)] = static_cast<int>(path.size());
    path.push_back(g);
    const auto& rd = pl.readers[static_cast<std::size_t>(g)];
    const auto it =
        std::find_if(rd.begin(), rd.end(), [&](int r) { return !pl.s[static_cast<std::size_t>(r)].written; });
    if (it == rd.end()) fail(errc::internal, "plan_serial: slot {} waits for no reader", g);
    g = *it;
  }
  return {path.begin() + seen[static_cast<std::size_t>(g)], path.end()};
}

// How good a slot is to save: its row is never an expert's only copy when its old expert stays in
// a kept slot; its rank can take the row back at any stop into a slot that stays empty or keeps an
// expert kept elsewhere too; slots whose save made an earlier try unsafe come last.
std::vector<int> save_scores(const planner& pl) {
  std::vector<int> kept(pl.s.size(), 0);  // per expert (fewer experts than slots): kept slots
  for (const auto& x : pl.s) {
    if (x.kind == slot_kind::keep && x.old_e >= 0) ++kept[static_cast<std::size_t>(x.old_e)];
  }
  std::vector<char> spare(static_cast<std::size_t>(pl.ranks), 0);
  for (const auto& x : pl.s) {
    if (x.kind == slot_kind::keep && (x.old_e < 0 || kept[static_cast<std::size_t>(x.old_e)] > 1)) {
      spare[static_cast<std::size_t>(x.rank)] = 1;
    }
  }
  std::vector<int> out(pl.s.size(), 0);
  for (std::size_t g = 0; g < pl.s.size(); ++g) {
    const auto& x = pl.s[g];
    if (x.old_e < 0) continue;
    out[g] = (kept[static_cast<std::size_t>(x.old_e)] > 0 ? 4 : 0) + (spare[static_cast<std::size_t>(x.rank)] ? 2 : 0) -
             (pl.avoid.empty() ? 0 : 8 * pl.avoid[g]);
  }
  return out;
}

// At a standstill: saves the best slot (save_scores) of each cycle whose ranks have a row free,
// then, with `spread`, more slots of long cycles so that they unwind in parallel.
void break_cycles(planner& pl, std::vector<serial_copy>& out, bool spread) {
  std::vector<char> on_cycle(pl.s.size(), 0);
  const auto score = save_scores(pl);
  for (int g = 0; g < static_cast<int>(pl.s.size()); ++g) {
    const auto& x = pl.s[static_cast<std::size_t>(g)];
    if (x.written || x.pending == 0 || x.kind == slot_kind::keep || x.kind == slot_kind::empty || on_cycle[g]) continue;
    const auto cyc = cycle_from(pl, g);
    for (int c : cyc) on_cycle[static_cast<std::size_t>(c)] = 1;
    int pick = -1;
    for (int c : cyc) {
      if (free_row(pl, pl.s[static_cast<std::size_t>(c)].rank) < 0) continue;
      if (pick < 0 || score[static_cast<std::size_t>(c)] > score[static_cast<std::size_t>(pick)]) pick = c;
    }
    if (pick < 0) continue;
    save(pl, pick, out);
    if (pl.one_cycle) return;
    if (!spread) continue;
    const std::size_t gap = std::max<std::size_t>(4, cyc.size() / (pl.rows * 2));
    const auto at = static_cast<std::size_t>(std::find(cyc.begin(), cyc.end(), pick) - cyc.begin());
    for (std::size_t k = gap; k + gap <= cyc.size(); k += gap) {
      const int c = cyc[(at + k) % cyc.size()];
      if (free_row(pl, pl.s[static_cast<std::size_t>(c)].rank) >= 0) save(pl, c, out);
    }
  }
}

}  // namespace

namespace {

// One chunk tried on a copy of the planner: `direct` moves into free slots and `staged` slots
// received into rows (read by this batch, written after it), then the local copies that follow.
struct chunk_try {
  planner pl;
  serial_chunk ch;
};

chunk_try try_chunk(const planner& base, const serial_chunk& before, const std::vector<int>& direct,
                    const std::vector<int>& staged) {
  chunk_try t{base, {before.before, {}, {}}};
  std::vector<int> row_of(staged.size(), -1);
  const auto add = [&](int g, int row) {
    const auto& x = t.pl.s[static_cast<std::size_t>(g)];
    const auto [from_slot, from_row] = source_of(t.pl, x);
    t.ch.moves.push_back({x.new_e, t.pl.s[static_cast<std::size_t>(x.provider)].rank, from_slot, from_row, x.rank,
                          row < 0 ? x.slot : -1, row});
  };
  for (int g : direct) add(g, -1);
  for (std::size_t i = 0; i < staged.size(); ++i) {
    const auto& x = t.pl.s[static_cast<std::size_t>(staged[i])];
    row_of[i] = free_row(t.pl, x.rank);
    t.pl.row_busy[static_cast<std::size_t>(x.rank)][static_cast<std::size_t>(row_of[i])] = 1;
    add(staged[i], row_of[i]);
  }
  // The wire order of a pair must be the same at both ends: ascending expert, then receiver.
  std::stable_sort(t.ch.moves.begin(), t.ch.moves.end(), [](const serial_move& a, const serial_move& b) {
    return std::tie(a.expert, a.to_rank) < std::tie(b.expert, b.to_rank);
  });
  for (int g : direct) mark_written(t.pl, g);
  // A staged slot read its provider in the batch; it is written from its row once its own readers
  // are done, among the local copies.
  for (std::size_t i = 0; i < staged.size(); ++i) {
    auto& x = t.pl.s[static_cast<std::size_t>(staged[i])];
    x.staged = row_of[i];
    x.read = true;
    auto& p = t.pl.s[static_cast<std::size_t>(x.provider)];
    if (--p.pending == 0 && p.row >= 0) {
      t.pl.row_busy[static_cast<std::size_t>(p.rank)][static_cast<std::size_t>(p.row)] = 0;
    }
  }
  local_fixpoint(t.pl, t.ch.after);
  return t;
}

// Remote slots that the batch's moves leave free (and that were not free before), to be received
// into rows in the same batch, as many per rank as it has rows free.
std::vector<int> freed_by(const planner& base, const planner& scratch, const std::vector<int>& staged) {
  std::vector<int> left(static_cast<std::size_t>(base.ranks), 0);
  for (int r = 0; r < base.ranks; ++r) {
    const auto& busy = base.row_busy[static_cast<std::size_t>(r)];
    left[static_cast<std::size_t>(r)] = static_cast<int>(std::count(busy.begin(), busy.end(), 0));
  }
  for (int g : staged) --left[static_cast<std::size_t>(base.s[static_cast<std::size_t>(g)].rank)];
  std::vector<int> out;
  for (int g = 0; g < static_cast<int>(scratch.s.size()); ++g) {
    const auto& x = scratch.s[static_cast<std::size_t>(g)];
    if (x.kind != slot_kind::remote || !scratch.ready(x) || base.ready(base.s[static_cast<std::size_t>(g)])) continue;
    if (left[static_cast<std::size_t>(x.rank)]-- > 0) out.push_back(g);
  }
  return out;
}

bool stops_safe(const serial_schedule& so_far, const serial_chunk& ch, std::span<const expert_id> old_row,
                int num_ranks) {
  serial_schedule t = so_far;
  t.chunks.push_back(ch);
  const int c = static_cast<int>(so_far.chunks.size());
  return serial_stop(t, old_row, num_ranks, c) && serial_stop(t, old_row, num_ranks, c + 1);
}

// The next chunk under cut_rule::stop_safe: where a stop after the batch could leave an expert only
// in a row on a rank with no slot to spare, the slots the batch frees are received into rows in
// the same batch, so that a cycle's walk goes on to where a stop is safe.
chunk_try safe_chunk(const planner& pl, const serial_chunk& before, const serial_schedule& so_far,
                     std::span<const expert_id> old_row) {
  std::vector<int> direct, staged;
  for (int g = 0; g < static_cast<int>(pl.s.size()); ++g) {
    const auto& x = pl.s[static_cast<std::size_t>(g)];
    if (x.kind == slot_kind::remote && pl.ready(x)) direct.push_back(g);
  }
  auto t = try_chunk(pl, before, direct, staged);
  serial_schedule refused = so_far;
  refused.chunks.push_back(t.ch);
  if (!serial_stop(refused, old_row, pl.ranks, static_cast<int>(so_far.chunks.size()))) {
    // A refused batch leaves its direct targets empty: receive them into rows where there are some.
    std::vector<int> left(static_cast<std::size_t>(pl.ranks), 0);
    for (int r = 0; r < pl.ranks; ++r) {
      const auto& busy = pl.row_busy[static_cast<std::size_t>(r)];
      left[static_cast<std::size_t>(r)] = static_cast<int>(std::count(busy.begin(), busy.end(), 0));
    }
    std::erase_if(direct, [&](int g) {
      if (left[static_cast<std::size_t>(pl.s[static_cast<std::size_t>(g)].rank)]-- <= 0) return false;
      staged.push_back(g);
      return true;
    });
    t = try_chunk(pl, before, direct, staged);
  }
  for (int round = 0; round < pl.ranks * pl.slots && !stops_safe(so_far, t.ch, old_row, pl.ranks); ++round) {
    auto more = freed_by(pl, t.pl, staged);
    if (more.empty()) break;
    staged.insert(staged.end(), more.begin(), more.end());
    auto next = try_chunk(pl, before, direct, staged);
    // Every staged slot must be written by the chunk's end (rows are not held across batches).
    if (std::any_of(staged.begin(), staged.end(),
                    [&](int g) { return !next.pl.s[static_cast<std::size_t>(g)].written; }))
      break;
    t = std::move(next);
  }
  return t;
}

// Copies left after the last batch need none: they follow it (or form the only chunk). Then the
// rows the schedule uses.
void finish(serial_schedule& out, const serial_chunk& cur) {
  out.rows = 0;
  if (out.chunks.empty()) out.chunks.emplace_back();
  auto& last = out.chunks.back().after;
  last.insert(last.end(), cur.before.begin(), cur.before.end());
  for (const auto& ch : out.chunks) {
    for (const auto* ops : {&ch.before, &ch.after}) {
      for (const auto& c : *ops) out.rows = std::max(out.rows, std::max(c.from_row, c.to_row) + 1);
    }
    for (const auto& m : ch.moves) out.rows = std::max(out.rows, std::max(m.from_row, m.to_row) + 1);
  }
}

planner make_planner(std::span<const expert_id> old_row, std::span<const expert_id> new_row, int num_ranks,
                     std::size_t buffer_rows) {
  if (buffer_rows == 0) fail(errc::invalid_argument, "plan_serial: needs at least one staging row");
  planner pl;
  pl.ranks = num_ranks;
  pl.slots = static_cast<int>(old_row.size()) / num_ranks;
  pl.rows = buffer_rows;
  pl.s.resize(old_row.size());
  pl.row_busy.assign(static_cast<std::size_t>(num_ranks), std::vector<char>(buffer_rows, 0));
  classify(pl, old_row, new_row);
  return pl;
}

// A chunk without a batch joins the previous chunk's copies (one stop fewer).
void push_chunk(serial_schedule& out, serial_chunk ch) {
  if (ch.moves.empty() && ch.before.empty() && !out.chunks.empty()) {
    auto& a = out.chunks.back().after;
    a.insert(a.end(), ch.after.begin(), ch.after.end());
    return;
  }
  out.chunks.push_back(std::move(ch));
}

// One cycle walked so that every stop keeps every expert: slot c0 is saved into row 0 of its rank
// (the carrier of its bytes), then c_i takes c_{i+1}'s bytes one step per batch, leaving those
// bytes in two slots, of ranks R_i and R_{i+1}; the carrier row moves along so that it is always on
// one of them (a stop writes it back over one of the two). A step's receive goes into a row unless
// the carrier is on the receiving rank (a refused batch's slot is then where the row goes back).
// One row per rank.
void walk_cycle(planner& pl, serial_schedule& out, const std::vector<int>& cyc) {
  std::vector<int> c{cyc.front()};
  for (int g = pl.s[static_cast<std::size_t>(c[0])].provider; g != c[0]; g = pl.s[static_cast<std::size_t>(g)].provider)
    c.push_back(g);
  const int m = static_cast<int>(c.size());
  const auto st = [&](int i) -> const slot_state& {
    return pl.s[static_cast<std::size_t>(c[static_cast<std::size_t>(i % m)])];
  };
  int cr = st(0).rank;
  for (int i = 0; i < m; ++i) {
    serial_chunk ch;
    if (i == 0) ch.before.push_back({cr, st(0).slot, -1, -1, 0});
    const bool last = i == m - 1;
    const int d = st(i).rank, src_rank = last ? cr : st(i + 1).rank;
    const int src_slot = last ? -1 : st(i + 1).slot, src_row = last ? 0 : -1;
    if (src_rank == d) {
      ch.after.push_back({d, src_slot, src_row, st(i).slot, -1});
    } else if (cr == d) {
      ch.moves.push_back({st(i).new_e, src_rank, src_slot, src_row, d, st(i).slot, -1});
    } else {
      ch.moves.push_back({st(i).new_e, src_rank, src_slot, src_row, d, -1, 0});
      ch.after.push_back({d, -1, 0, st(i).slot, -1});
    }
    if (!last && cr != d && cr != st(i + 1).rank) {
      ch.moves.push_back({st(0).old_e, cr, -1, 0, st(i + 1).rank, -1, 0});
      cr = st(i + 1).rank;
    }
    mark_written(pl, c[static_cast<std::size_t>(i)]);
    push_chunk(out, std::move(ch));
  }
}

// The last resort under cut_rule::stop_safe: trees as usual, cycles one at a time by walk_cycle.
// nullptr when a stop is still unsafe (a tree's batch, checked).
std::shared_ptr<serial_schedule> plan_walks(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                            int num_ranks, int num_logical, std::size_t buffer_rows) {
  auto pl = make_planner(old_row, new_row, num_ranks, buffer_rows);
  auto out = std::make_shared<serial_schedule>();
  out->num_logical = num_logical;
  serial_chunk cur;
  local_fixpoint(pl, cur.before);
  while (pl.left > 0) {
    cur.moves = ready_moves(pl);
    if (cur.moves.empty()) {
      if (!cur.before.empty()) out->chunks.push_back(std::move(cur));
      cur = {};
      const auto it = std::find_if(pl.s.begin(), pl.s.end(), [](const slot_state& x) {
        return !x.written && x.pending > 0 && (x.kind == slot_kind::local || x.kind == slot_kind::remote);
      });
      if (it == pl.s.end()) fail(errc::internal, "plan_serial: no progress with {} slots left", pl.left);
      walk_cycle(pl, *out, cycle_from(pl, static_cast<int>(it - pl.s.begin())));
      local_fixpoint(pl, cur.before);
      continue;
    }
    for (const auto& mv : cur.moves) mark_written(pl, mv.to_rank * pl.slots + mv.to_slot);
    local_fixpoint(pl, cur.after);
    out->chunks.push_back(std::move(cur));
    cur = {};
  }
  finish(*out, cur);
  for (int c = 0; c < static_cast<int>(out->chunks.size()); ++c) {
    if (!serial_stop(*out, old_row, num_ranks, c)) return nullptr;
  }
  return out;
}

std::shared_ptr<serial_schedule> plan_with(std::span<const expert_id> old_row, std::span<const expert_id> new_row,
                                           int num_ranks, int num_logical, std::size_t buffer_rows, bool spread,
                                           std::vector<char> avoid, bool safe, bool one_cycle = false) {
  auto pl = make_planner(old_row, new_row, num_ranks, buffer_rows);
  pl.avoid = std::move(avoid);
  pl.one_cycle = one_cycle;
  auto out = std::make_shared<serial_schedule>();
  out->num_logical = num_logical;
  serial_chunk cur;
  local_fixpoint(pl, cur.before);
  out->rows = static_cast<int>(buffer_rows);  // for the stops checked on the way
  while (pl.left > 0) {
    cur.moves = ready_moves(pl);
    if (cur.moves.empty()) {
      const auto saved = cur.before.size();
      break_cycles(pl, cur.before, spread);
      local_fixpoint(pl, cur.before);
      if (cur.before.size() == saved) fail(errc::internal, "plan_serial: no progress with {} slots left", pl.left);
      continue;
    }
    if (safe) {
      auto t = safe_chunk(pl, cur, *out, old_row);
      pl = std::move(t.pl);
      out->chunks.push_back(std::move(t.ch));
      cur = {};
      continue;
    }
    for (const auto& m : cur.moves) mark_written(pl, m.to_rank * pl.slots + m.to_slot);
    local_fixpoint(pl, cur.after);
    out->chunks.push_back(std::move(cur));
    cur = {};
  }
  finish(*out, cur);
  return out;
}

}  // namespace

std::shared_ptr<const serial_schedule> plan_serial(std::span<const expert_id> old_row,
                                                   std::span<const expert_id> new_row, int num_ranks, int num_logical,
                                                   std::size_t buffer_rows, bool spread) {
  return plan_with(old_row, new_row, num_ranks, num_logical, buffer_rows, spread, {}, false);
}

std::shared_ptr<const serial_schedule> plan_serial_stop_safe(std::span<const expert_id> old_row,
                                                             std::span<const expert_id> new_row, int num_ranks,
                                                             int num_logical, std::size_t buffer_rows) {
  std::vector<char> avoid(old_row.size(), 0);
  const int slots = static_cast<int>(old_row.size()) / num_ranks;
  // Cycles unwound together first; then one at a time, so that a walk has the rows of every rank
  // it passes to itself and can go on to a safe stop.
  for (int attempt = 0; attempt < 16; ++attempt) {
    if (attempt == 8) std::fill(avoid.begin(), avoid.end(), 0);
    auto sch = plan_with(old_row, new_row, num_ranks, num_logical, buffer_rows, false, avoid, true, attempt >= 8);
    int unsafe = -1;
    for (int c = 0; c < static_cast<int>(sch->chunks.size()) && unsafe < 0; ++c) {
      if (!serial_stop(*sch, old_row, num_ranks, c)) unsafe = c;
    }
    if (unsafe < 0) return sch;
    // Saving another slot of the same cycles may leave the row on a rank with a slot to spare.
    for (int c = 0; c <= unsafe; ++c) {
      for (const auto& op : sch->chunks[static_cast<std::size_t>(c)].before) {
        if (op.to_row >= 0) avoid[static_cast<std::size_t>(op.rank * slots + op.from_slot)] = 1;
      }
    }
  }
  return plan_walks(old_row, new_row, num_ranks, num_logical, buffer_rows);
}

}  // namespace eplb::exec

// serial_stop(): what a layer moved by a serial schedule (plan_serial) holds when every rank
// stopped before the same chunk, replayed op by op, and the staging rows written back so that every
// expert keeps a live slot.
#include <algorithm>
#include <optional>

#include "eplb/exec/plan.hpp"

namespace eplb::exec {
namespace {

// What every live slot and staging row holds while a serial schedule runs (expert ids, -1 none).
struct serial_state {
  int slots = 0;
  std::vector<expert_id> slot;
  std::vector<std::vector<expert_id>> rows;  // per rank

  expert_id read(int rank, int from_slot, int from_row) const {
    return from_slot >= 0 ? slot[static_cast<std::size_t>(rank * slots + from_slot)]
                          : rows[static_cast<std::size_t>(rank)][static_cast<std::size_t>(from_row)];
  }
  void apply(const std::vector<serial_copy>& ops) {
    for (const auto& c : ops) {
      const expert_id e = read(c.rank, c.from_slot, c.from_row);
      if (c.to_slot >= 0) {
        slot[static_cast<std::size_t>(c.rank * slots + c.to_slot)] = e;
      } else {
        rows[static_cast<std::size_t>(c.rank)][static_cast<std::size_t>(c.to_row)] = e;
      }
    }
  }
};

// An expert left only in staging rows goes back into a slot of a rank holding it that the maps
// leave empty (preferred) or whose expert has another copy. False when there is none.
bool write_back(const serial_state& st, expert_id e, std::vector<int>& copies, stopped_layer& out) {
  for (int r = 0; r < static_cast<int>(st.rows.size()); ++r) {
    const auto& rr = st.rows[static_cast<std::size_t>(r)];
    const auto it = std::find(rr.begin(), rr.end(), e);
    if (it == rr.end()) continue;
    for (const bool empty_only : {true, false}) {
      for (int x = 0; x < st.slots; ++x) {
        auto& now = out.row[static_cast<std::size_t>(r * st.slots + x)];
        if (empty_only ? now >= 0 : now < 0 || copies[static_cast<std::size_t>(now)] < 2) continue;
        if (now >= 0) --copies[static_cast<std::size_t>(now)];
        now = e;
        ++copies[static_cast<std::size_t>(e)];
        out.repairs.push_back({r, x, -1, static_cast<int>(it - rr.begin())});
        return true;
      }
    }
  }
  return false;
}

}  // namespace

std::optional<stopped_layer> serial_stop(const serial_schedule& sch, std::span<const expert_id> old_row, int num_ranks,
                                         int done) {
  serial_state st;
  st.slots = static_cast<int>(old_row.size()) / num_ranks;
  st.slot.assign(old_row.begin(), old_row.end());
  st.rows.assign(static_cast<std::size_t>(num_ranks), std::vector<expert_id>(static_cast<std::size_t>(sch.rows), -1));
  for (int c = 0; c < done; ++c) {
    const auto& ch = sch.chunks[static_cast<std::size_t>(c)];
    st.apply(ch.before);
    for (const auto& m : ch.moves) {
      const expert_id e = st.read(m.from_rank, m.from_slot, m.from_row);
      if (m.to_slot >= 0) {
        st.slot[static_cast<std::size_t>(m.to_rank * st.slots + m.to_slot)] = e;
      } else {
        st.rows[static_cast<std::size_t>(m.to_rank)][static_cast<std::size_t>(m.to_row)] = e;
      }
    }
    st.apply(ch.after);
  }
  if (done < static_cast<int>(sch.chunks.size())) {
    // The refused batch: its saves ran, what it sent into slots and rows may be anything.
    const auto& ch = sch.chunks[static_cast<std::size_t>(done)];
    st.apply(ch.before);
    for (const auto& m : ch.moves) {
      if (m.to_slot >= 0) {
        st.slot[static_cast<std::size_t>(m.to_rank * st.slots + m.to_slot)] = -1;
      } else {
        st.rows[static_cast<std::size_t>(m.to_rank)][static_cast<std::size_t>(m.to_row)] = -1;
      }
    }
  }
  stopped_layer out{st.slot, {}};
  std::vector<int> copies(static_cast<std::size_t>(sch.num_logical), 0);
  for (const expert_id e : out.row) {
    if (e >= 0) ++copies[static_cast<std::size_t>(e)];
  }
  for (expert_id e = 0; e < sch.num_logical; ++e) {
    if (copies[static_cast<std::size_t>(e)] == 0 && !write_back(st, e, copies, out)) return std::nullopt;
  }
  return out;
}

}  // namespace eplb::exec

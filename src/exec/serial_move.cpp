// The serial stager: runs a layer's serial schedule (plan_serial) on this rank. Each chunk: its
// saves into staging rows, then its batch (bundles sent from live slots or rows straight into live
// slots nothing reads any more), then, once the batch is written everywhere, its local copies.
#include "eplb/exec/rearrange.hpp"
#include "exec/layer_transfer.hpp"
#include "util/fail.hpp"

namespace eplb::exec {
namespace {

// Where this rank's bytes of one layer are: live slots and staging rows, tensor by tensor.
struct serial_places {
  const row_layout& at;
  int layer;
  const rank_weights& w;
  std::byte* area;

  [[nodiscard]] int tensors() const { return static_cast<int>(at.shape->bundle.size()); }
  [[nodiscard]] std::size_t bytes(int t) const {
    return at.shape->bundle[static_cast<std::size_t>(t)].bytes_per_expert;
  }
  [[nodiscard]] std::byte* place(int t, int slot, int row) const {
    return slot >= 0 ? w.slot(*at.shape, layer, t, slot) : at.row(area, row, t);
  }
};

void run_copies(const serial_places& pl, std::span<const serial_copy> ops, device::stream& s, layer_stats& st) {
  for (const auto& c : ops) {
    if (c.rank != pl.at.rank) continue;
    for (int t = 0; t < pl.tensors(); ++t) {
      s.copy(pl.place(t, c.to_slot, c.to_row), pl.place(t, c.from_slot, c.from_row), pl.bytes(t));
    }
    if (c.to_slot >= 0) st.bytes_copied_locally += pl.at.shape->expert_bytes();
  }
}

void account(const serial_places& pl, int peer, layer_stats& st) {
  const auto& shape = *pl.at.shape;
  const int rpn = shape.ranks_per_node > 0 ? shape.ranks_per_node : shape.num_ranks;
  (peer / rpn == pl.at.rank / rpn ? st.bytes_same_node : st.bytes_cross_node) += shape.expert_bytes();
  add_peer_bytes(st, shape.num_ranks, peer, shape.expert_bytes());
}

// The batch of one chunk: both ends post a pair's messages in the schedule's order.
void post_moves(const serial_places& pl, std::span<const serial_move> moves, comm::communicator& comm,
                layer_stats& st) {
  for (const auto& m : moves) {
    const bool send = m.from_rank == pl.at.rank, recv = m.to_rank == pl.at.rank;
    if (!send && !recv) continue;
    for (int t = 0; t < pl.tensors(); ++t) {
      if (send) comm.add_send({pl.place(t, m.from_slot, m.from_row), pl.bytes(t)}, m.to_rank);
      if (recv) comm.add_recv({pl.place(t, m.to_slot, m.to_row), pl.bytes(t)}, m.from_rank);
      ++st.messages;
    }
    (send ? st.bytes_sent : st.bytes_received) += pl.at.shape->expert_bytes();
    account(pl, send ? m.to_rank : m.from_rank, st);
  }
}

// Every rank stopped before chunk `done`: the slots its batch wrote into are left empty in the maps,
// and this rank writes back the rows serial_stop names, alike on every rank. Returns the row the
// maps then name.
std::vector<expert_id> write_back(const serial_places& pl, const serial_schedule& sch,
                                  std::span<const expert_id> old_row, int done, device::stream& s,
                                  std::chrono::milliseconds timeout) {
  const auto stop = serial_stop(sch, old_row, pl.at.shape->num_ranks, done);
  if (!stop) fail(errc::internal, "plan_serial: a stop after chunk {} loses an expert", done);
  for (const auto& r : stop->repairs) {
    if (r.rank != pl.at.rank) continue;
    for (int t = 0; t < pl.tensors(); ++t) s.copy(pl.place(t, r.slot, -1), pl.place(t, -1, r.row), pl.bytes(t));
  }
  s.synchronize(timeout);
  return stop->row;
}

}  // namespace

layer_stats rearranger::move_serial(int layer, const rank_weights& w, std::span<const expert_id> old_row,
                                    const chunk_plan& chunks, layer_stop& stop) {
  const auto start = std::chrono::steady_clock::now();
  const auto& sch = *chunks.serial;
  reserve(staging_, staging_reg_, rows_ * row_bytes_, rows_ * row_bytes_);
  const auto at = layout();
  const serial_places pl{at, layer, w, staging_.data()};
  layer_stats st{.layer = layer, .chunks = static_cast<int>(sch.chunks.size())};
  for (std::size_t c = 0; c < sch.chunks.size(); ++c) {
    const auto& ch = sch.chunks[c];
    std::exception_ptr failure;
    try {
      run_copies(pl, ch.before, stream_, st);
      try {
        post_moves(pl, ch.moves, *comm_, st);
      } catch (...) {
        comm_->discard_pending();  // half a batch must not join the next one
        throw;
      }
      comm_->execute();
    } catch (const error& e) {
      failure = std::make_exception_ptr(
          error(e.code(),
                fmt::format("failed in chunk {} of {} of a serial schedule, which writes live slots in its batches: "
                            "the layer is partly moved ({})",
                            c + 1, sch.chunks.size(), e.what())));
    }
    try {
      pass_gate(layer, static_cast<int>(c), failure);
    } catch (...) {
      if (opts_.commit_gate) {
        stop.row = write_back(pl, sch, old_row, static_cast<int>(c), stream_, opts_.timeout);
        stop.done = static_cast<int>(c);
      }
      throw;
    }
    run_copies(pl, ch.after, stream_, st);
  }
  stream_.synchronize(opts_.timeout);  // surface any device error before the maps commit
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return st;
}

}  // namespace eplb::exec

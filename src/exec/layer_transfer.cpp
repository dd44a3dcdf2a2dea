#include "exec/layer_transfer.hpp"

#include <algorithm>
#include <numeric>

#include "util/fail.hpp"

namespace eplb::exec {

void write_rows(const row_layout& at, int layer, const rank_weights& w, std::span<const std::pair<int, int>> writes,
                const std::byte* area, device::stream& s) {
  const auto& bundle = at.shape->bundle;
  for (std::size_t i = 0; i < writes.size();) {
    std::size_t n = 1;
    while (i + n < writes.size() && writes[i + n].first == writes[i].first + static_cast<int>(n) &&
           writes[i + n].second == writes[i].second + static_cast<int>(n)) {
      ++n;
    }
    for (std::size_t t = 0; t < bundle.size(); ++t) {
      s.copy_2d(w.slot(*at.shape, layer, static_cast<int>(t), writes[i].first), bundle[t].stride,
                area + static_cast<std::size_t>(writes[i].second) * at.row_bytes + at.offsets[t], at.row_bytes,
                bundle[t].bytes_per_expert, n);
    }
    i += n;
  }
}

layer_transfer::layer_transfer(const row_layout& at, int layer, const rank_weights& w, layer_plan plan,
                               std::size_t rows, const pack_rule& packing)
    : at_(at),
      layer_(layer),
      w_(w),
      p_(std::move(plan)),
      n_(static_cast<std::size_t>(at.shape->num_ranks)),
      eb_(at.shape->expert_bytes()),
      buffer_slots_(p_.buffer_slots()) {
  stats.layer = layer;
  stats.chunks = 1;
  row_of_.assign(static_cast<std::size_t>(p_.slots), -1);
  free_rows_.resize(rows);
  std::iota(free_rows_.rbegin(), free_rows_.rend(), 0);
  decide_packing(packing);
}

// Whether `sender` packs what it sends `receiver`: the pair's bytes fit the cap and, under a
// budget, the sender's walk over its peers in ascending order still has room for them. Both ends
// compute it from the same pair counts, so they decide alike.
bool layer_transfer::packs(const pack_rule& rule, std::size_t sender, std::size_t receiver) const {
  const auto bytes = [&](std::size_t to) { return (*rule.pairs)[sender * n_ + to] * eb_; };
  const auto worth = [&](std::size_t b) {
    if (rule.all) return b > 0;
    return rule.cap > 0 && b <= rule.cap && (b / eb_) * at_.shape->bundle.size() >= 2;
  };
  if (rule.all || rule.budget == 0) return worth(bytes(receiver));
  std::size_t used = 0;
  for (std::size_t q = 0; q <= receiver; ++q) {
    const auto b = bytes(q);
    if (!worth(b) || used + b > rule.budget) {
      if (q == receiver) return false;
      continue;
    }
    used += b;
  }
  return true;
}

// The pair counts must say what this rank's own plan sends and receives: a receiver decides its
// senders' packing from them.
void layer_transfer::check_pairs(const std::vector<std::size_t>& pairs) const {
  const auto me = static_cast<std::size_t>(p_.rank);
  if (pairs.size() != n_ * n_) fail(errc::internal, "layer {}: pair counts for {} ranks", layer_, n_);
  for (std::size_t q = 0; q < n_; ++q) {
    if (pairs[me * n_ + q] * eb_ != send_bytes_[q] || pairs[q * n_ + me] * eb_ != recv_bytes_[q]) {
      fail(errc::internal, "layer {}: pair counts with rank {} differ from rank {}'s plan", layer_, q, me);
    }
  }
}

void layer_transfer::decide_packing(const pack_rule& rule) {
  send_bytes_.resize(n_);
  recv_bytes_.resize(n_);
  for (const auto& s : p_.sends) send_bytes_[static_cast<std::size_t>(s.peer)] += eb_;
  for (const auto& r : p_.recvs) recv_bytes_[static_cast<std::size_t>(r.peer)] += eb_;
  // This rank's own pairs, as the pair counts say (they must, or the two ends could disagree).
  std::vector<std::size_t> own;
  if (rule.pairs == nullptr) {
    own.assign(n_ * n_, 0);
    const auto me = static_cast<std::size_t>(p_.rank);
    for (std::size_t q = 0; q < n_; ++q) {
      own[me * n_ + q] = send_bytes_[q] / eb_;
      own[q * n_ + me] = recv_bytes_[q] / eb_;
    }
  }
  pack_rule rule_here = rule;
  if (rule.pairs == nullptr) {
    rule_here.pairs = &own;
    rule_here.budget = 0;  // without every pair, only a cap both ends see
  }
  check_pairs(*rule_here.pairs);
  pack_send_.resize(n_);
  pack_recv_.resize(n_);
  const auto me = static_cast<std::size_t>(p_.rank);
  for (std::size_t q = 0; q < n_; ++q) {
    pack_send_[q] = q != me && packs(rule_here, me, q);
    pack_recv_[q] = q != me && packs(rule_here, q, me);
    pack_at_.push_back(pack_total_);
    if (pack_send_[q]) pack_total_ += send_bytes_[q];
  }
  // Receives of a packed peer land in consecutive rows (fresh rows come off the stack in order).
  recv_rows_.resize(n_);
  for (std::size_t q = 0; q < n_; ++q) {
    if (!pack_recv_[q]) continue;
    recv_rows_[q].first = free_rows_.back();
    for (const auto& r : p_.recvs) {
      if (static_cast<std::size_t>(r.peer) != q) continue;
      row_of_[static_cast<std::size_t>(r.slot)] = static_cast<int>(free_rows_.back());
      free_rows_.pop_back();
      ++recv_rows_[q].second;
    }
  }
}

void layer_transfer::schedule(const chunk_plan& chunks) {
  position_ = &chunks.position;
  stats.chunks = static_cast<int>(chunks.ranges.size());
  pending_.clear();
  for (int s = 0; s < p_.slots; ++s) {
    const auto u = static_cast<std::size_t>(s);
    const int ready = write_ready_after(p_, chunks, s);
    if (ready < 0) continue;  // nothing to write
    if (p_.from_local[u] || p_.primary[u]) pending_.push_back({s, s, ready});
    if (p_.primary_of[u] >= 0) pending_.push_back({s, p_.primary_of[u], ready});
  }
}

bool layer_transfer::in_batch(expert_id e, int lo, int hi) const {
  if (position_ == nullptr) return true;
  const int pos = (*position_)[static_cast<std::size_t>(e)];
  return pos >= lo && pos < hi;
}

void layer_transfer::post(int lo, int hi, std::byte* area, std::byte* pack, device::stream& copies,
                          comm::communicator& comm) {
  take_rows(lo, hi, area, copies);
  post_recvs(lo, hi, area, comm);
  post_sends(lo, hi, pack, copies, comm);
}

void layer_transfer::take_rows(int lo, int hi, std::byte* area, device::stream& copies) {
  for (int s : buffer_slots_) {
    const auto u = static_cast<std::size_t>(s);
    auto& r = row_of_[u];
    if (!in_batch(p_.new_local[u], lo, hi) || r >= 0) continue;
    if (free_rows_.empty()) fail(errc::internal, "staging rows exhausted (plan_chunks broke its promise)");
    r = static_cast<int>(free_rows_.back());
    free_rows_.pop_back();
    if (p_.from_local[u]) {
      for (int t = 0; t < tensors(); ++t) copies.copy(at_.row(area, r, t), slot(t, p_.local_source[u]), bytes(t));
      stats.bytes_copied_locally += eb_;
    }
  }
}

void layer_transfer::post_recvs(int lo, int hi, std::byte* area, comm::communicator& comm) {
  for (std::size_t q = 0; q < n_; ++q) {
    if (!pack_recv_[q] || recv_rows_[q].second == 0 || !in_batch(first_recv(q), lo, hi)) continue;
    comm.add_recv({at_.row(area, static_cast<int>(recv_rows_[q].first), 0), recv_rows_[q].second * at_.row_bytes},
                  static_cast<int>(q));
    ++stats.messages;
  }
  for (const auto& r : p_.recvs) {
    if (!in_batch(r.expert, lo, hi)) continue;
    stats.bytes_received += eb_;
    account(r.peer);
    if (pack_recv_[static_cast<std::size_t>(r.peer)]) continue;
    for (int t = 0; t < tensors(); ++t) {
      comm.add_recv({at_.row(area, row_of_[static_cast<std::size_t>(r.slot)], t), bytes(t)}, r.peer);
      ++stats.messages;
    }
  }
}

void layer_transfer::post_sends(int lo, int hi, std::byte* pack, device::stream& copies, comm::communicator& comm) {
  cursor_ = pack_at_;
  packed_now_.assign(n_, 0);
  for (const auto& s : p_.sends) {
    if (!in_batch(s.expert, lo, hi)) continue;
    stats.bytes_sent += eb_;
    account(s.peer);
    const auto q = static_cast<std::size_t>(s.peer);
    for (int t = 0; t < tensors(); ++t) {
      if (pack_send_[q]) {
        copies.copy(pack + cursor_[q], slot(t, s.slot), bytes(t));
        cursor_[q] += bytes(t);
        packed_now_[q] = 1;
      } else {
        comm.add_send({slot(t, s.slot), bytes(t)}, s.peer);
        ++stats.messages;
      }
    }
  }
  for (std::size_t q = 0; q < n_; ++q) {
    if (!packed_now_[q]) continue;
    comm.add_send({pack + pack_at_[q], send_bytes_[q]}, static_cast<int>(q));
    ++stats.messages;
  }
}

void layer_transfer::write_ready(int hi, std::byte* area, device::stream& s) {
  std::erase_if(pending_, [&](const pending_write& wr) {
    if (wr.ready_after >= hi) return false;
    const int r = row_of_[static_cast<std::size_t>(wr.from_slot)];
    for (int t = 0; t < tensors(); ++t) s.copy(slot(t, wr.slot), at_.row(area, r, t), bytes(t));
    if (wr.slot != wr.from_slot) stats.bytes_copied_locally += eb_;
    return true;
  });
  for (int sl : buffer_slots_) {
    auto& r = row_of_[static_cast<std::size_t>(sl)];
    if (r < 0) continue;
    const bool needed =
        std::any_of(pending_.begin(), pending_.end(), [&](const auto& wr) { return wr.from_slot == sl; });
    if (!needed) {
      free_rows_.push_back(static_cast<std::size_t>(r));
      r = -2;  // released for good
    }
  }
}

void layer_transfer::write_staged(int slot, int staged_slot, std::byte* area, device::stream& s) {
  const int r = row_of_[static_cast<std::size_t>(staged_slot)];
  if (r < 0) fail(errc::internal, "layer {}: slot {}'s staging row is not held", layer_, staged_slot);
  for (int t = 0; t < tensors(); ++t) s.copy(this->slot(t, slot), at_.row(area, r, t), bytes(t));
}

void layer_transfer::whole_layer_writes(row_writes& out) {
  for (int sl : buffer_slots_) out.emplace_back(sl, row_of_[static_cast<std::size_t>(sl)]);
  for (int sl = 0; sl < p_.slots; ++sl) {
    if (const int from = p_.primary_of[static_cast<std::size_t>(sl)]; from >= 0) {
      out.emplace_back(sl, row_of_[static_cast<std::size_t>(from)]);
      stats.bytes_copied_locally += eb_;
    }
  }
}

// Packing is only used for one-batch layers, so a packed peer's receives are all in one batch.
expert_id layer_transfer::first_recv(std::size_t peer) const {
  for (const auto& r : p_.recvs) {
    if (static_cast<std::size_t>(r.peer) == peer) return r.expert;
  }
  return -1;
}

void layer_transfer::account(int peer) {
  const auto& shape = *at_.shape;
  const int rpn = shape.ranks_per_node > 0 ? shape.ranks_per_node : shape.num_ranks;
  (peer / rpn == at_.rank / rpn ? stats.bytes_same_node : stats.bytes_cross_node) += eb_;
  add_peer_bytes(stats, shape.num_ranks, peer, eb_);
}

std::byte* layer_transfer::slot(int tensor, int s) const {
  return w_.slot(*at_.shape, layer_, tensor, s);
}

std::size_t layer_transfer::bytes(int tensor) const {
  return at_.shape->bundle[static_cast<std::size_t>(tensor)].bytes_per_expert;
}

int layer_transfer::tensors() const noexcept {
  return static_cast<int>(at_.shape->bundle.size());
}

}  // namespace eplb::exec

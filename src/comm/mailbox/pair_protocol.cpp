#include "comm/mailbox/pair_protocol.hpp"

#include <algorithm>
#include <thread>

#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::comm {
namespace {

using device::cuda::check;

// FNV-1a over the message sizes of one pair's batch.
std::uint64_t size_hash(const std::vector<std::size_t>& sizes) {
  std::uint64_t h = 1469598103934665603ULL;
  for (auto s : sizes) {
    for (int i = 0; i < 8; ++i) {
      h ^= (s >> (8 * i)) & 0xff;
      h *= 1099511628211ULL;
    }
  }
  return h;
}

}  // namespace

pair_protocol::pair_protocol(int rank, int size, const options& o, const mailbox_geometry& g,
                             const control_block& control, const mailbox_memory& memory)
    : rank_(rank), size_(size), opts_(o), geometry_(g), control_(control), memory_(memory) {
  const auto n = static_cast<std::size_t>(size);
  const std::size_t lanes = opts_.lanes == 0 ? n : static_cast<std::size_t>(opts_.lanes);
  for (std::size_t i = 0; i < 2 * std::min(lanes, n); ++i) lanes_.emplace_back();
  out_streams_.assign(n, nullptr);
  in_streams_.assign(n, nullptr);
  out_events_.resize(n);
  in_events_.resize(n);
  for (std::size_t r = 0; r < n; ++r) {
    if (static_cast<int>(r) == rank) continue;
    const std::size_t lane = r % (lanes_.size() / 2);
    out_streams_[r] = lanes_[2 * lane].get();
    in_streams_[r] = lanes_[2 * lane + 1].get();
    for (std::size_t k = 0; k < geometry_.slots; ++k) {
      out_events_[r].emplace_back();
      in_events_[r].emplace_back();
    }
  }
  sent_base_.assign(n, 0);
  received_base_.assign(n, 0);
  manifests_sent_.assign(n, 0);
  manifests_received_.assign(n, 0);
}

// Peers in shift order: rank r serves r+1, r+2, ... and drains r-1, r-2, ... Copy engines run
// copies roughly in the order they were issued, so issuing every rank's sends to the same peer
// first would pile all writers onto one GPU; in shift order each phase is a permutation.
void pair_protocol::open(std::span<const op> ops, pair_batch& batch) const {
  const auto n = static_cast<std::size_t>(size_);
  batch.sends.assign(n, {});
  batch.recvs.assign(n, {});
  for (const auto& o : ops) {
    auto& st = (o.is_send ? batch.sends : batch.recvs)[static_cast<std::size_t>(o.peer)];
    st.peer = o.peer;
    st.data.push_back(o.data);
    st.sizes.push_back(o.bytes);
    st.total += o.bytes;
  }
  const auto now = mailbox_clock::now();
  for (std::size_t shift = 1; shift < n; ++shift) {
    const std::size_t to = (static_cast<std::size_t>(rank_) + shift) % n;
    const std::size_t from = (static_cast<std::size_t>(rank_) + n - shift) % n;
    for (const bool send : {true, false}) {
      auto& st = send ? batch.sends[to] : batch.recvs[from];
      if (st.peer < 0) continue;
      st.chunks = geometry_.chunks(st.total);
      st.base = send ? sent_base_[to] : received_base_[from];
      st.last_progress = now;
      (send ? batch.active_sends : batch.active_recvs).push_back(&st);
    }
  }
}

void pair_protocol::wait_for(cudaEvent_t start, const pair_batch& batch) {
  if (start == nullptr) return;
  for (auto* st : batch.active_sends) {
    check(cudaStreamWaitEvent(out_streams_[static_cast<std::size_t>(st->peer)], start, 0), "cudaStreamWaitEvent");
  }
  for (auto* st : batch.active_recvs) {
    check(cudaStreamWaitEvent(in_streams_[static_cast<std::size_t>(st->peer)], start, 0), "cudaStreamWaitEvent");
  }
}

void pair_protocol::close(const pair_batch& batch) {
  for (auto* st : batch.active_sends) sent_base_[static_cast<std::size_t>(st->peer)] += st->chunks;
  for (auto* st : batch.active_recvs) received_base_[static_cast<std::size_t>(st->peer)] += st->chunks;
}

// The receiver has checked our previous manifest, so its fields may be overwritten.
bool pair_protocol::post_manifest(pair_stream& st, pair_control& ctl) {
  const auto p = static_cast<std::size_t>(st.peer);
  if (st.manifest_done || ctl.manifest_read.load(std::memory_order_acquire) != manifests_sent_[p]) return false;
  ctl.count.store(st.sizes.size(), std::memory_order_relaxed);
  ctl.total.store(st.total, std::memory_order_relaxed);
  ctl.hash.store(size_hash(st.sizes), std::memory_order_relaxed);
  ctl.manifest_posted.store(++manifests_sent_[p], std::memory_order_release);
  st.manifest_done = true;
  return true;
}

bool pair_protocol::read_manifest(pair_stream& st, pair_control& ctl) {
  const auto p = static_cast<std::size_t>(st.peer);
  if (st.manifest_done || ctl.manifest_posted.load(std::memory_order_acquire) <= manifests_received_[p]) return false;
  const auto count = ctl.count.load(std::memory_order_relaxed);
  const auto total = ctl.total.load(std::memory_order_relaxed);
  const auto hash = ctl.hash.load(std::memory_order_relaxed);
  if (count != st.sizes.size() || total != st.total || hash != size_hash(st.sizes)) {
    fail(errc::invalid_argument,
         "{} rank {}: sizes do not match: rank {} sends {} message(s) of {} bytes in all, this rank "
         "expects {} message(s) of {} bytes{}",
         memory_.name(), rank_, st.peer, count, total, st.sizes.size(), st.total,
         count == st.sizes.size() && total == st.total ? " (same totals, different sizes)" : "");
  }
  ctl.manifest_read.store(++manifests_received_[p], std::memory_order_release);
  st.manifest_done = true;
  return true;
}

bool pair_protocol::advance_send(pair_stream& st, bool may_issue) {
  const auto p = static_cast<std::size_t>(st.peer);
  auto& ctl = control_.pair(rank_, st.peer);
  bool progress = post_manifest(st, ctl);
  const std::uint64_t drained = ctl.drained.load(std::memory_order_acquire);
  if (drained > st.base + st.acked && st.acked < st.chunks) {
    st.acked = std::min(st.chunks, drained - st.base);
    progress = true;
  }
  while (may_issue && st.issued < st.chunks && st.base + st.issued - drained < geometry_.slots && paced(st)) {
    const std::uint64_t g = st.base + st.issued;
    copy_chunk(st, st.issued, slot(rank_, st.peer, g), true, out_streams_[p]);
    out_event(p, g).record(out_streams_[p]);
    ++st.issued;
    progress = true;
  }
  while (st.completed < st.issued && out_event(p, st.base + st.completed).done()) {
    ++st.completed;
    ctl.filled.store(st.base + st.completed, std::memory_order_release);
    progress = true;
  }
  if (progress) st.last_progress = mailbox_clock::now();
  return progress;
}

bool pair_protocol::advance_recv(pair_stream& st) {
  const auto p = static_cast<std::size_t>(st.peer);
  auto& ctl = control_.pair(st.peer, rank_);
  bool progress = read_manifest(st, ctl);
  if (st.manifest_done) {
    const std::uint64_t filled = ctl.filled.load(std::memory_order_acquire);
    while (st.issued < st.chunks && st.base + st.issued < filled) {
      const std::uint64_t g = st.base + st.issued;
      copy_chunk(st, st.issued, slot(st.peer, rank_, g), false, in_streams_[p]);
      in_event(p, g).record(in_streams_[p]);
      ++st.issued;
      progress = true;
    }
  }
  while (st.completed < st.issued && in_event(p, st.base + st.completed).done()) {
    ++st.completed;
    ctl.drained.store(st.base + st.completed, std::memory_order_release);
    progress = true;
  }
  st.acked = st.completed;
  if (progress) st.last_progress = mailbox_clock::now();
  return progress;
}

// With a rate cap, a chunk may start once the previous ones have had their share of time; the
// pace carries over between batches, so an async rebalance of many layers keeps to the cap.
bool pair_protocol::paced(const pair_stream& st) {
  if (opts_.cuda_ipc_max_gbps <= 0) return true;
  const auto now = mailbox_clock::now();
  if (now < pace_next_) return false;
  const std::size_t begin = static_cast<std::size_t>(st.issued) * geometry_.slot_bytes;
  const double bytes = static_cast<double>(std::min(st.total, begin + geometry_.slot_bytes) - begin);
  pace_next_ = std::max(now, pace_next_) + std::chrono::duration_cast<mailbox_clock::duration>(
                                               std::chrono::duration<double>(bytes / (opts_.cuda_ipc_max_gbps * 1e9)));
  return true;
}

// Copies chunk `k` of a pair's byte stream between the messages and `slot` (to the slot when
// sending, out of it when receiving); a chunk may span several messages.
void pair_protocol::copy_chunk(const pair_stream& st, std::uint64_t k, std::byte* slot, bool to_slot, cudaStream_t s) {
  const std::size_t begin = static_cast<std::size_t>(k) * geometry_.slot_bytes;
  const std::size_t end = std::min(st.total, begin + geometry_.slot_bytes);
  std::size_t msg_start = 0;
  for (std::size_t i = 0; i < st.sizes.size() && msg_start < end; msg_start += st.sizes[i], ++i) {
    const std::size_t lo = std::max(begin, msg_start);
    const std::size_t hi = std::min(end, msg_start + st.sizes[i]);
    if (lo >= hi) continue;
    std::byte* msg = st.data[i] + (lo - msg_start);
    std::byte* box = slot + (lo - begin);
    check(cudaMemcpyAsync(to_slot ? box : msg, to_slot ? msg : box, hi - lo, cudaMemcpyDefault, s), "cudaMemcpyAsync");
  }
}

// The slot of a pair's chunk, in the mailbox that holds the pair's region: the receiver's in push
// mode, the sender's in pull mode.
std::byte* pair_protocol::slot(int sender, int receiver, std::uint64_t chunk) const {
  const int owner = opts_.cuda_ipc_pull ? sender : receiver;
  const int other = opts_.cuda_ipc_pull ? receiver : sender;
  std::byte* base = owner == rank_ ? memory_.own() : memory_.peer(owner);
  return base + geometry_.offset(owner, other, chunk);
}

device::cuda::event_handle& pair_protocol::out_event(std::size_t peer, std::uint64_t chunk) {
  return out_events_[peer][static_cast<std::size_t>(chunk % geometry_.slots)];
}

device::cuda::event_handle& pair_protocol::in_event(std::size_t peer, std::uint64_t chunk) {
  return in_events_[peer][static_cast<std::size_t>(chunk % geometry_.slots)];
}

bool pair_protocol::settle(milliseconds timeout) noexcept {
  const auto deadline = deadline_after(timeout);
  bool settled = true;
  for (const auto& s : lanes_) {
    while (s.busy() && mailbox_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::microseconds(50));
    if (s.busy()) settled = false;
  }
  (void)cudaGetLastError();
  return settled;
}

bool pair_protocol::fence(cudaStream_t caller) noexcept {
  return device::cuda::order_after(caller, lanes_);
}

}  // namespace eplb::comm

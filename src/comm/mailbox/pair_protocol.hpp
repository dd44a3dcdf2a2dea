// The protocol between the two ranks of a pair, over a mailbox region and the control block. A
// pair's messages of one batch form one byte stream, moved as a FIFO of slot-sized chunks:
//   manifest: the sender writes (message count, total bytes, a hash of the sizes) once the
//     receiver has read its previous one; the receiver compares it with what it expects, so
//     mismatched sizes are an error on both sides, not a hang;
//   filled: the sender's count of chunks in the slots, published once its copy of a chunk has
//     completed (its own CUDA event), never earlier: no rank reads a slot before it is written;
//   drained: the receiver's count of chunks copied out, published the same way; the sender reuses
//     a slot only after that.
// No GPU stream ever waits on another process, so a dead or stalled peer cannot wedge a stream.
// Chunk numbers run on across batches; all of this runs on the transport's batch thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <vector>

#include "comm/mailbox/control_block.hpp"
#include "comm/mailbox/geometry.hpp"
#include "comm/mailbox/memory.hpp"
#include "comm/transport.hpp"
#include "device/cuda_handles.hpp"

namespace eplb::comm {

using mailbox_clock = std::chrono::steady_clock;

/// One direction of one pair within a batch: its messages as a byte stream cut into chunks.
struct pair_stream {
  int peer = -1;
  std::vector<std::byte*> data;
  std::vector<std::size_t> sizes;
  std::size_t total = 0;
  std::uint64_t chunks = 0;     // in this batch
  std::uint64_t base = 0;       // global index of this batch's first chunk
  std::uint64_t issued = 0;     // copies enqueued
  std::uint64_t completed = 0;  // copies finished and published
  std::uint64_t acked = 0;      // sends: chunks the receiver has copied out
  bool manifest_done = false;
  mailbox_clock::time_point last_progress;

  /// A send is finished only once the receiver has copied every chunk out: then no copy anywhere
  /// still needs this rank (its mailbox may go away, its process may exit).
  [[nodiscard]] bool finished() const noexcept { return manifest_done && completed == chunks && acked == chunks; }
};

/// One batch: a stream per peer and direction, and the active ones in the order they are served.
struct pair_batch {
  std::vector<pair_stream> sends, recvs;  // indexed by peer
  std::vector<pair_stream*> active_sends, active_recvs;
};

class pair_protocol {
 public:
  pair_protocol(int rank, int size, const options& o, const mailbox_geometry& g, const control_block& control,
                const mailbox_memory& memory);

  /// Cuts `ops` into the batch's streams and numbers their chunks on from the previous batch.
  void open(std::span<const op> ops, pair_batch& batch) const;
  /// Our copies start after the work the caller queued before `start` (e.g. packing).
  void wait_for(cudaEvent_t start, const pair_batch& batch);
  /// One step of a send or a receive: post the manifest, issue copies the slots allow, publish
  /// the ones completed. `may_issue`: earlier sends in shift order have issued all of theirs.
  /// True when anything moved. errc::invalid_argument when the sizes of a pair disagree.
  bool advance_send(pair_stream& st, bool may_issue);
  bool advance_recv(pair_stream& st);
  /// A batch every stream of which finished: the next one numbers on after it.
  void close(const pair_batch& batch);
  /// Waits (at most `timeout`) for our copy streams; false when some copy still runs.
  bool settle(milliseconds timeout) noexcept;
  /// Orders `caller` (null: the legacy default stream) after every copy queued so far, for copies
  /// that outlived settle(): the caller's buffers are then freed after them. False when CUDA
  /// refused (nothing is known then).
  bool fence(cudaStream_t caller) noexcept;

 private:
  bool post_manifest(pair_stream& st, pair_control& ctl);
  bool read_manifest(pair_stream& st, pair_control& ctl);
  bool paced(const pair_stream& st);
  void copy_chunk(const pair_stream& st, std::uint64_t k, std::byte* slot, bool to_slot, cudaStream_t s);
  std::byte* slot(int sender, int receiver, std::uint64_t chunk) const;
  device::cuda::event_handle& out_event(std::size_t peer, std::uint64_t chunk);
  device::cuda::event_handle& in_event(std::size_t peer, std::uint64_t chunk);

  int rank_;
  int size_;
  options opts_;
  mailbox_geometry geometry_;
  const control_block& control_;
  const mailbox_memory& memory_;
  // Copy streams per direction: one per peer (lanes 0), or `lanes` shared round-robin.
  std::vector<device::cuda::stream_handle> lanes_;                               // out, in, out, in, ...
  std::vector<cudaStream_t> out_streams_, in_streams_;                           // per peer, into lanes_
  std::vector<std::vector<device::cuda::event_handle>> out_events_, in_events_;  // per peer, per slot
  std::vector<std::uint64_t> sent_base_, received_base_, manifests_sent_, manifests_received_;
  mailbox_clock::time_point pace_next_{};  // earliest start of the next paced chunk
};

}  // namespace eplb::comm

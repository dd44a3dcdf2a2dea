// What a communicator backend implements. The public communicator (eplb/comm/communicator.hpp)
// queues operations, checks peers, runs execute_async() jobs and calls a transport for the rest;
// it destroys its transport only after its last job, so a transport's destructor never races one.
#pragma once

#include <atomic>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>

#include "eplb/comm/communicator.hpp"

namespace eplb::comm {

/// One queued send or receive.
struct op {
  bool is_send;
  std::byte* data;
  std::size_t bytes;
  int peer;
};

class transport {
 public:
  /// error(errc::invalid_argument) for a size <= 0 or a rank outside it.
  transport(int rank, int size);
  virtual ~transport() = default;
  transport(const transport&) = delete;
  transport& operator=(const transport&) = delete;

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  [[nodiscard]] virtual backend kind() const noexcept = 0;
  [[nodiscard]] virtual capabilities caps() const noexcept = 0;

  /// Runs one batch; sends and receives appear in the order they were added. Called by one
  /// thread at a time: the caller's, or the communicator's worker.
  virtual void run(std::span<const op> ops) = 0;
  /// Stream-ordered transports: enqueue one batch and return the event after it (submit()), and
  /// wait for such an event watching for peer errors. Defaults: run() and an event already complete.
  virtual device::event enqueue(std::span<const op> ops);
  virtual void await(const device::event& e);

  /// Defaults: nothing to register (communicator::register_memory, allocate_registered). A
  /// transport that wraps a communicator must forward both, or its rank would be the only one
  /// unregistered.
  [[nodiscard]] virtual registration register_memory(std::span<std::byte> region);
  [[nodiscard]] virtual registered_memory allocate_registered(std::size_t bytes);
  /// communicator::reserve_memory(). Default: nothing to allocate. A wrapping transport forwards it.
  virtual device::memory_use reserve_memory();

  /// Ends every pending and future wait of this transport promptly with errc::cancelled naming
  /// `why`, and tells the peers that this rank is stopping where the backend can (loopback: its
  /// world; gloo: its connections close; mailboxes: its failure flag), so that they fail with
  /// errc::peer_failure naming it instead of waiting for the timeout. Any thread, any time;
  /// idempotent, never throws. A batch in flight still returns only once nothing of it can touch
  /// its buffers any more (the memory rule holds for aborted transfers too).
  void abort(std::string_view why) noexcept;
  [[nodiscard]] bool abort_requested() const noexcept { return aborted_.load(std::memory_order_acquire); }
  /// Why abort() was called; empty before.
  [[nodiscard]] std::string abort_reason() const;

  /// The caller's stream (communicator::set_stream); not owned.
  void set_stream(device::stream* s) noexcept { stream_ = s; }
  [[nodiscard]] device::stream* stream() const noexcept { return stream_; }

 protected:
  /// The backend's part of abort(), called once by the aborting thread after abort_requested()
  /// turned true: wake its waits and tell the peers. Default: nothing (a backend whose waits poll
  /// abort_requested() needs no more). A transport that wraps a communicator forwards it.
  virtual void on_abort(const std::string& why) noexcept;

 private:
  int rank_;
  int size_;
  device::stream* stream_ = nullptr;
  std::atomic<bool> aborting_{false};  // the first abort() wins
  std::atomic<bool> aborted_{false};   // published after abort_reason_ is written, never before
  std::string abort_reason_;
};

}  // namespace eplb::comm

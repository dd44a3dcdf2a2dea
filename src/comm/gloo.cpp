// Gloo: point-to-point over TCP. Device memory is staged through pinned host memory on the stream
// given by set_stream(): per peer and direction a worker moves the peer's messages as a FIFO of
// chunks, keeping a window of chunks in flight over several TCP lanes (one Gloo context and device
// each, because one TCP stream moves only 3-4 GB/s), so that the D2H copy of chunk k+1 overlaps the
// send of chunk k and the receive of chunk k overlaps the H2D copy of chunk k-1. Without a stream,
// buffers must be host memory and chunks move in place.
//
// Each execute() starts with a manifest per peer (the sizes each side will send and expects), so a
// size mismatch is a clear error on both sides instead of a hang. Workers depend only on their own
// peer, and each has a fixed share of the staging cap, so no cycle of waits can form.
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include <csignal>

#include <algorithm>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <fmt/ranges.h>

#include "comm/backends.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"
#include "util/thread_priority.hpp"

namespace eplb::comm {
namespace {

using clock = std::chrono::steady_clock;

// Gloo's Store over ours, so Gloo's rendezvous uses the same store (file, TCP, memory) as the rest.
class gloo_store_adapter final : public gloo::rendezvous::Store {
 public:
  gloo_store_adapter(std::shared_ptr<store> inner, milliseconds timeout)
      : inner_(std::move(inner)), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    inner_->set(key, std::string(data.begin(), data.end()));
  }
  std::vector<char> get(const std::string& key) override {
    const auto v = inner_->get(key, timeout_);
    return {v.begin(), v.end()};
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    for (const auto& k : keys) (void)inner_->get(k, timeout);
  }

 private:
  std::shared_ptr<store> inner_;
  milliseconds timeout_;
};

constexpr std::uint64_t slot_manifest = 0;
constexpr std::uint64_t slot_data = 1;

struct chunk {
  std::byte* data;
  std::size_t bytes;
};

// Splits one peer's messages (in order) into chunks of at most chunk_bytes; empty messages vanish.
std::vector<chunk> chunks_of(const std::vector<const void*>& ops_data, const std::vector<std::size_t>& sizes,
                             std::size_t chunk_bytes) {
  std::vector<chunk> out;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    auto* base = static_cast<std::byte*>(const_cast<void*>(ops_data[i]));
    for (std::size_t off = 0; off < sizes[i]; off += chunk_bytes) {
      out.push_back({base + off, std::min(chunk_bytes, sizes[i] - off)});
    }
  }
  return out;
}

// Gloo writes to sockets without MSG_NOSIGNAL: a peer that dies mid-transfer would kill this
// process with SIGPIPE instead of giving an error naming it. Ignore SIGPIPE unless the application
// installed its own handler.
void ignore_sigpipe() {
  struct sigaction current {};
  if (::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) ::signal(SIGPIPE, SIG_IGN);
}

// Every Gloo buffer that may have an operation pending, so that abort() (any thread) can end its
// waits: Gloo's waitSend/waitRecv return false once abortWaitSend/abortWaitRecv was called, also
// when called before the wait starts. After abort() no buffer is made any more.
class buffer_registry {
 public:
  using buffer = gloo::transport::UnboundBuffer;
  struct untrack {
    buffer_registry* registry;
    void operator()(buffer* b) const noexcept {
      registry->remove(b);
      delete b;  // NOLINT(cppcoreguidelines-owning-memory): released from Gloo's unique_ptr in make()
    }
  };
  using tracked = std::unique_ptr<buffer, untrack>;

  // Errors: errc::cancelled once aborted.
  tracked make(gloo::rendezvous::Context& ctx, void* data, std::size_t bytes, const std::function<void()>& refuse) {
    auto made = ctx.createUnboundBuffer(data, bytes);
    std::lock_guard lock(mutex_);
    if (aborted_) refuse();  // throws; `made` goes before any operation was posted on it
    live_.insert(made.get());
    return tracked(made.release(), untrack{this});
  }
  // Closes the connections (so that nothing lands in a buffer any more and the peers hear of it
  // at once), then wakes every wait. Under the lock: no buffer is destroyed meanwhile.
  void abort(const std::vector<std::shared_ptr<gloo::rendezvous::Context>>& lanes) noexcept {
    std::lock_guard lock(mutex_);
    aborted_ = true;
    for (const auto& ctx : lanes) {
      try {
        ctx->closeConnections();
      } catch (...) {  // NOLINT(bugprone-empty-catch): a pair already closed by an error
      }
    }
    for (auto* b : live_) {
      b->abortWaitRecv();
      b->abortWaitSend();
    }
  }

 private:
  void remove(buffer* b) noexcept {
    std::lock_guard lock(mutex_);
    live_.erase(b);
  }

  std::mutex mutex_;
  std::set<buffer*> live_;
  bool aborted_ = false;
};

class gloo_tcp_transport final : public transport {
 public:
  gloo_tcp_transport(const setup& s) : transport(s.rank, s.size), opts_(s.opts), dev_(s.dev), store_(s.rendezvous) {
    if (!store_) fail(errc::invalid_argument, "gloo communicator: setup.rendezvous (a store) is missing");
    ignore_sigpipe();
    if (opts_.lanes < 0 || opts_.lanes > 64) {
      fail(errc::invalid_argument, "gloo: lanes must be in 0..64 (0 = automatic), got {}", opts_.lanes);
    }
    if (opts_.lanes == 0) {
      // Enough lanes to fill the host's TCP bandwidth between few ranks (16 measured best between
      // 2 H200 ranks), fewer as peers multiply, and no more sender threads than about 2 per core
      // (each execute starts lanes x peers of them). The manifest checks both ends agree.
      const int cores = static_cast<int>(std::max(2U, std::thread::hardware_concurrency()));
      opts_.lanes = std::clamp(std::min(64, 2 * cores) / std::max(1, size() - 1), 2, 16);
    }
    if (opts_.chunk_bytes == 0) fail(errc::invalid_argument, "gloo: chunk_bytes must be > 0");
    if (opts_.staging_bytes == 0) fail(errc::invalid_argument, "gloo: staging_bytes must be > 0");
    // Both ends of a pair must cut messages identically, so the chunk size depends only on values
    // every rank shares; it also lets the cap hold one chunk per peer, direction and lane at worst.
    const auto worst_case_slots =
        2 * static_cast<std::size_t>(std::max(1, size() - 1)) * static_cast<std::size_t>(opts_.lanes);
    chunk_bytes_ = std::max<std::size_t>(1, std::min(opts_.chunk_bytes, opts_.staging_bytes / worst_case_slots));
    if (opts_.nice < 0 || opts_.nice > 19)
      fail(errc::invalid_argument, "gloo: nice must be in 0..19, got {}", opts_.nice);
    if (opts_.nice == 0) {
      connect();
    } else {
      // Gloo's transport threads start here and inherit the priority of the thread that creates them.
      std::exception_ptr failure;
      std::thread([&] {
        lower_thread_priority(opts_.nice);
        try {
          connect();
        } catch (...) {
          failure = std::current_exception();
        }
      }).join();
      if (failure) std::rethrow_exception(failure);
    }
    if (dev_ != nullptr && dev_->kind() == device::backend_kind::cuda) {
      // Pinned memory is taken now, not mid-rebalance: allocating and freeing it holds the driver
      // and synchronizes the device, which would stall the serving loop.
      staging_ = dev_->allocate(opts_.staging_bytes, device::memory_kind::pinned);
    }
  }
  ~gloo_tcp_transport() override {
    // After a failed batch the stream may still hold copies into or out of staging: it goes once
    // the stream has passed them (kept for good if the stream could not say when).
    if (staging_lost_) device::keep_for_good(std::move(staging_));
    if (staging_busy_.valid()) dev_->release_after(std::move(staging_), {staging_busy_});
  }

  backend kind() const noexcept override { return backend::gloo; }
  // The whole cap now: prepare_staging() cuts every batch's windows out of at most staging_bytes.
  device::memory_use reserve_memory() override {
    device::memory_use use;
    if (dev_ == nullptr) return use;
    if (!broken_ && staging_.size() < opts_.staging_bytes) {
      staging_ = dev_->allocate(opts_.staging_bytes, device::memory_kind::pinned);
    }
    use.add(device::memory_kind::pinned, staging_.size());
    return use;
  }
  capabilities caps() const noexcept override {
    return {.host_complete = true,
            .background_safe = true,
            .crosses_nodes = true,
            .device_memory = true,
            .host_memory = true};
  }

  void run(std::span<const op> ops) override {
    if (abort_requested()) fail(errc::cancelled, "gloo rank {}: aborted ({})", rank(), abort_reason());
    if (broken_) {
      fail(errc::transport, "gloo rank {}: communicator is unusable after an earlier failure ({}); create a new one",
           rank(), broken_reason_);
    }
    const bool staged = stream() != nullptr;
    if (staged && dev_ == nullptr) fail(errc::invalid_argument, "gloo: a stream is set but setup.dev is missing");

    // Per peer, in order: what we send and what we expect.
    std::map<int, peer_plan> peers;
    for (const auto& o : ops) {
      auto& p = peers[o.peer];
      (o.is_send ? p.send_data : p.recv_data).push_back(o.data);
      (o.is_send ? p.send_sizes : p.recv_sizes).push_back(o.bytes);
    }
    const auto deadline = deadline_after(opts_.timeout);
    std::size_t window_bytes = 0;
    if (staged) window_bytes = prepare_staging(peers);

    std::vector<std::thread> workers;
    std::mutex failure_mutex;
    std::exception_ptr failure;
    const auto guard = [&](auto fn) {
      return [&, fn] {
        try {
          fn();
        } catch (...) {
          std::lock_guard lock(failure_mutex);
          if (!failure) failure = std::current_exception();
        }
      };
    };
    std::size_t staging_offset = 0;
    for (auto& [peer, plan] : peers) {
      plan.generation = ++generation_[peer];
      std::byte* send_area = staged ? staging_.data() + staging_offset : nullptr;
      std::byte* recv_area = staged ? staging_.data() + staging_offset + window_bytes : nullptr;
      staging_offset += 2 * window_bytes;
      workers.emplace_back(guard([this, peer, &plan, send_area, recv_area, window_bytes, deadline] {
        lower_thread_priority(opts_.nice);  // the sender and lane threads started below inherit it
        try {
          exchange_with(peer, plan, send_area, recv_area, window_bytes, deadline);
        } catch (const eplb::error&) {
          throw;
        } catch (const std::exception& e) {
          peer_failed(peer, "exchanging with", e);  // Gloo throws from posting too, not only from waits
        }
      }));
    }
    for (auto& t : workers) t.join();
    if (failure) {
      // Ops may still be posted in Gloo; closing every lane guarantees no late write lands.
      break_lanes(failure);
      if (staged) note_staging_in_use();
      std::rethrow_exception(failure);
    }
  }

 private:
  // Any thread: the workers' waits end (errc::cancelled), the peers see the connections close.
  void on_abort(const std::string& /*why*/) noexcept override { buffers_.abort(lanes_); }

  buffer_registry::tracked make_buffer(gloo::rendezvous::Context& ctx, void* data, std::size_t bytes) {
    return buffers_.make(ctx, data, bytes,
                         [this] { fail(errc::cancelled, "gloo rank {}: aborted ({})", rank(), abort_reason()); });
  }

  struct peer_plan {
    std::vector<const void*> send_data;
    std::vector<std::size_t> send_sizes;
    std::vector<const void*> recv_data;
    std::vector<std::size_t> recv_sizes;
    std::uint64_t generation = 0;
  };

  void exchange_with(int peer, const peer_plan& plan, std::byte* send_area, std::byte* recv_area,
                     std::size_t window_bytes, clock::time_point deadline) {
    exchange_manifest(peer, plan, deadline);
    std::exception_ptr send_failure;
    std::thread sender([&] {
      try {
        send_all(peer, plan, send_area, window_bytes, deadline);
      } catch (...) {
        send_failure = std::current_exception();
      }
    });
    try {
      receive_all(peer, plan, recv_area, window_bytes, deadline);
    } catch (...) {
      sender.join();
      throw;
    }
    sender.join();
    if (send_failure) std::rethrow_exception(send_failure);
  }

  void connect() {
    auto adapter = std::make_shared<gloo_store_adapter>(store_, opts_.timeout);
    for (int lane = 0; lane < opts_.lanes; ++lane) {
      gloo::transport::tcp::attr attr;
      attr.hostname = opts_.hostname;
      attr.ai_family = AF_UNSPEC;
      auto device = gloo::transport::tcp::CreateDevice(attr);
      auto context = std::make_shared<gloo::rendezvous::Context>(rank(), size());
      context->setTimeout(opts_.timeout);
      gloo::rendezvous::PrefixStore prefixed(fmt::format("gloo-lane-{}", lane), *adapter);
      try {
        context->connectFullMesh(prefixed, device);
      } catch (const eplb::error& e) {
        fail(e.code(), "gloo rank {}: could not connect lane {} to all {} ranks: {}", rank(), lane, size(), e.what());
      } catch (const std::exception& e) {
        fail(errc::peer_failure,
             "gloo rank {}: could not connect lane {} to all {} ranks (a peer closed the connection): {}", rank(), lane,
             size(), e.what());
      }
      devices_.push_back(std::move(device));
      lanes_.push_back(std::move(context));
    }
    // Every rank has every lane before anyone uses one, so an early exchange never meets a peer
    // that is still connecting.
    store_barrier(*store_, "gloo-connected", size(), opts_.timeout);
  }

  // Splits the staging cap evenly over peers and directions; returns each worker's window in bytes
  // (a whole number of chunks per lane, at least one).
  std::size_t prepare_staging(const std::map<int, peer_plan>& peers) {
    // Staging slots hold one chunk; a batch of small messages needs small slots, and no more of
    // them than its largest peer-direction has chunks (allocating the whole cap for a few KiB would
    // cost more than the transfer).
    std::size_t largest = 1, most_chunks = 1;
    for (const auto& [peer, plan] : peers) {
      for (const auto* sizes : {&plan.send_sizes, &plan.recv_sizes}) {
        std::size_t chunks = 0;
        for (auto b : *sizes) {
          largest = std::max(largest, std::min(b, chunk_bytes_));
          chunks += (b + chunk_bytes_ - 1) / chunk_bytes_;
        }
        most_chunks = std::max(most_chunks, chunks);
      }
    }
    slot_bytes_ = largest;
    const std::size_t lanes = lanes_.size();
    const std::size_t parts = 2 * std::max<std::size_t>(peers.size(), 1);
    const std::size_t cap_slots = std::max(lanes, (opts_.staging_bytes / parts / slot_bytes_) / lanes * lanes);
    const std::size_t need_slots = (most_chunks + lanes - 1) / lanes * lanes;
    const std::size_t window = std::min(cap_slots, need_slots) * slot_bytes_;
    if (staging_.size() < window * parts) staging_ = dev_->allocate(window * parts, device::memory_kind::pinned);
    return window;
  }

  gloo::rendezvous::Context& lane(std::size_t k) { return *lanes_[k % lanes_.size()]; }
  std::uint64_t tag(std::uint64_t generation, std::uint64_t kind) const { return generation * 2 + kind; }

  [[noreturn]] void peer_failed(int peer, const char* what, const std::exception& e) {
    // After abort() the closed connections fail what was posted: that is this rank's stop.
    if (abort_requested())
      fail(errc::cancelled, "gloo rank {}: {} rank {} aborted ({})", rank(), what, peer, abort_reason());
    const std::string msg = e.what();
    if (msg.find("Timed out") != std::string::npos) {
      fail(errc::timeout, "gloo rank {}: {} rank {} timed out after {} ms", rank(), what, peer, opts_.timeout.count());
    }
    fail(errc::peer_failure, "gloo rank {}: {} rank {} failed (peer died or closed the connection): {}", rank(), what,
         peer, msg);
  }

  milliseconds left(clock::time_point deadline, int peer, const char* what) {
    const auto ms = std::chrono::duration_cast<milliseconds>(deadline - clock::now());
    if (ms.count() <= 0)
      fail(errc::timeout, "gloo rank {}: {} rank {} timed out after {} ms", rank(), what, peer, opts_.timeout.count());
    return ms;
  }

  // Waits for one Gloo operation; Gloo's exceptions become errors naming the peer.
  void wait_op(gloo::transport::UnboundBuffer& b, bool send, int peer, clock::time_point deadline) {
    const char* what = send ? "sending to" : "receiving from";
    try {
      const auto budget = left(deadline, peer, what);
      if (!(send ? b.waitSend(nullptr, budget) : b.waitRecv(nullptr, budget))) {
        fail(errc::cancelled, "gloo rank {}: {} rank {} aborted ({})", rank(), what, peer, abort_reason());
      }
    } catch (const eplb::error&) {
      throw;
    } catch (const std::exception& e) {
      peer_failed(peer, what, e);
    }
  }
  void wait_send(gloo::transport::UnboundBuffer& b, int peer, clock::time_point deadline) {
    wait_op(b, true, peer, deadline);
  }
  void wait_recv(gloo::transport::UnboundBuffer& b, int peer, clock::time_point deadline) {
    wait_op(b, false, peer, deadline);
  }

  void exchange_manifest(int peer, const peer_plan& plan, clock::time_point deadline) {
    std::vector<std::uint64_t> mine{plan.send_sizes.size(), plan.recv_sizes.size()};
    mine.insert(mine.end(), plan.send_sizes.begin(), plan.send_sizes.end());
    mine.insert(mine.end(), plan.recv_sizes.begin(), plan.recv_sizes.end());
    // Counts, then how messages are cut and spread: lanes and chunk size must agree on both sides
    // or chunks would land in the wrong places.
    std::uint64_t my_counts[4] = {mine[0], mine[1], lanes_.size(), chunk_bytes_};
    std::uint64_t their_counts[4] = {};
    auto& ctx = lane(0);
    const auto t = tag(plan.generation, slot_manifest);
    auto out_counts = make_buffer(ctx, my_counts, sizeof my_counts);
    auto in_counts = make_buffer(ctx, their_counts, sizeof their_counts);
    in_counts->recv(peer, t);
    out_counts->send(peer, t);
    wait_recv(*in_counts, peer, deadline);
    wait_send(*out_counts, peer, deadline);
    if (their_counts[2] != my_counts[2] || their_counts[3] != my_counts[3]) {
      fail(errc::invalid_argument,
           "gloo rank {}: rank {} uses {} lanes and {}-byte chunks, this rank {} and {} (set options.lanes and "
           "chunk_bytes explicitly, the same on every rank)",
           rank(), peer, their_counts[2], their_counts[3], my_counts[2], my_counts[3]);
    }
    std::vector<std::uint64_t> theirs(2 + their_counts[0] + their_counts[1]);
    auto out = make_buffer(ctx, mine.data(), mine.size() * sizeof(std::uint64_t));
    auto in = make_buffer(ctx, theirs.data(), theirs.size() * sizeof(std::uint64_t));
    in->recv(peer, t);
    out->send(peer, t);
    wait_recv(*in, peer, deadline);
    wait_send(*out, peer, deadline);
    const std::vector<std::uint64_t> they_send(theirs.begin() + 2,
                                               theirs.begin() + 2 + static_cast<std::ptrdiff_t>(their_counts[0]));
    const std::vector<std::uint64_t> they_expect(theirs.begin() + 2 + static_cast<std::ptrdiff_t>(their_counts[0]),
                                                 theirs.end());
    const std::vector<std::uint64_t> i_expect(plan.recv_sizes.begin(), plan.recv_sizes.end());
    const std::vector<std::uint64_t> i_send(plan.send_sizes.begin(), plan.send_sizes.end());
    if (they_send != i_expect || they_expect != i_send) {
      fail(errc::invalid_argument,
           "gloo rank {}: transfers with rank {} do not match: it sends [{}] and expects [{}]; this rank expects [{}] "
           "and "
           "sends [{}] (bytes per message, in order)",
           rank(), peer, fmt::join(they_send, ","), fmt::join(they_expect, ","), fmt::join(i_expect, ","),
           fmt::join(i_send, ","));
    }
  }

  // One thread per lane: Gloo writes to the socket on the thread that posts a send, so a single
  // sender would serialise every lane behind one copy into the kernel (measured: lanes did not add
  // bandwidth until sends were posted from a thread per lane).
  void send_all(int peer, const peer_plan& plan, std::byte* area, std::size_t window, clock::time_point deadline) {
    const auto chunks = chunks_of(plan.send_data, plan.send_sizes, chunk_bytes_);
    const std::size_t n = std::min(lanes_.size(), chunks.size());
    std::vector<std::exception_ptr> failures(n);
    std::vector<std::thread> threads;
    for (std::size_t l = 0; l < n; ++l) {
      threads.emplace_back([&, l] {
        try {
          send_lane(peer, plan, chunks, l, area + l * (window / lanes_.size()), window / lanes_.size(), deadline);
        } catch (...) {
          failures[l] = std::current_exception();
        }
      });
    }
    for (auto& t : threads) t.join();
    for (auto& f : failures) {
      if (f) std::rethrow_exception(f);
    }
  }

  // Chunks lane, lane + L, lane + 2L... of one peer: D2H into a free staging slot, then send once
  // the copy is done, keeping the lane's slots busy.
  void send_lane(int peer, const peer_plan& plan, const std::vector<chunk>& chunks, std::size_t lane_index,
                 std::byte* area, std::size_t lane_window, clock::time_point deadline) {
    std::vector<std::size_t> mine;
    for (std::size_t k = lane_index; k < chunks.size(); k += lanes_.size()) mine.push_back(k);
    const std::size_t slots = stream() ? lane_window / slot_bytes_ : mine.size();
    const auto t = tag(plan.generation, slot_data);
    auto& ctx = *lanes_[lane_index];
    struct in_flight {
      buffer_registry::tracked buffer;
      device::event staged;
    };
    std::deque<in_flight> staged_q, posted_q;
    std::size_t next_stage = 0;
    for (std::size_t next_post = 0; next_post < mine.size(); ++next_post) {
      while (next_stage < mine.size() && staged_q.size() + posted_q.size() < slots) {
        const auto& c = chunks[mine[next_stage]];
        void* src = c.data;
        if (stream()) {
          std::byte* slot = area + (next_stage % slots) * slot_bytes_;
          stream()->copy(slot, c.data, c.bytes);
          src = slot;
        }
        staged_q.push_back({make_buffer(ctx, src, c.bytes), stream() ? stream()->record() : device::event()});
        ++next_stage;
      }
      auto f = std::move(staged_q.front());
      staged_q.pop_front();
      if (f.staged.valid()) f.staged.wait(left(deadline, peer, "staging for"));
      f.buffer->send(peer, t);
      posted_q.push_back(std::move(f));
      if (staged_q.empty() || posted_q.size() >= slots) {
        wait_send(*posted_q.front().buffer, peer, deadline);
        posted_q.pop_front();
      }
    }
    for (auto& f : posted_q) wait_send(*f.buffer, peer, deadline);
  }

  void receive_all(int peer, const peer_plan& plan, std::byte* area, std::size_t window, clock::time_point deadline) {
    const auto chunks = chunks_of(plan.recv_data, plan.recv_sizes, chunk_bytes_);
    const std::size_t slots = stream() ? window / slot_bytes_ : chunks.size();
    const auto t = tag(plan.generation, slot_data);
    std::deque<buffer_registry::tracked> posted;
    std::vector<device::event> drained(slots);  // H2D done: the staging slot may be reused
    std::size_t next_post = 0;
    for (std::size_t k = 0; k < chunks.size(); ++k) {
      while (next_post < chunks.size() && posted.size() < slots) {
        const auto& c = chunks[next_post];
        void* dst = c.data;
        if (stream()) {
          const std::size_t s = next_post % slots;
          if (drained[s].valid()) drained[s].wait(left(deadline, peer, "draining staging for"));
          dst = area + s * slot_bytes_;
        }
        posted.push_back(make_buffer(lane(next_post), dst, c.bytes));
        posted.back()->recv(peer, t);
        ++next_post;
      }
      wait_recv(*posted.front(), peer, deadline);
      posted.pop_front();
      if (stream()) {
        const std::size_t s = k % slots;
        stream()->copy(chunks[k].data, area + s * slot_bytes_, chunks[k].bytes);
        drained[s] = stream()->record();
      }
    }
    // Host-complete: every received byte is in place before execute() returns.
    for (auto& e : drained) {
      if (e.valid()) e.wait(left(deadline, peer, "draining staging for"));
    }
  }

  // A failed batch's waits may have timed out with copies still queued on the stream.
  void note_staging_in_use() noexcept {
    try {
      staging_busy_ = stream()->record();
    } catch (...) {
      staging_lost_ = true;
    }
  }

  void break_lanes(std::exception_ptr why) noexcept {
    broken_ = true;
    try {
      std::rethrow_exception(why);
    } catch (const std::exception& e) {
      broken_reason_ = e.what();
    } catch (...) {
      broken_reason_ = "unknown error";
    }
    for (auto& ctx : lanes_) {
      try {
        ctx->closeConnections();
      } catch (...) {
      }
    }
  }

  options opts_;
  device::device* dev_;
  std::shared_ptr<store> store_;
  std::vector<std::shared_ptr<gloo::transport::Device>> devices_;
  std::vector<std::shared_ptr<gloo::rendezvous::Context>> lanes_;
  buffer_registry buffers_;                  // after lanes_: abort() closes them under its lock
  std::map<int, std::uint64_t> generation_;  // per peer: both sides count the executes they share
  device::buffer staging_;
  device::event staging_busy_;   // after a failure: the stream has passed its last use of staging_
  bool staging_lost_ = false;    // after a failure the stream could not record: staging_ is never freed
  std::size_t chunk_bytes_ = 0;  // how messages are cut (the same on every rank)
  std::size_t slot_bytes_ = 0;   // one staging slot this batch: the largest chunk it has
  bool broken_ = false;
  std::string broken_reason_;
};

}  // namespace

std::unique_ptr<transport> make_gloo(const setup& s) {
  return std::make_unique<gloo_tcp_transport>(s);
}

}  // namespace eplb::comm

// Loopback: ranks are threads of one process. A send publishes a pointer to the sender's bytes on
// the (sender, receiver) queue; the receiver copies straight from it and marks it consumed. Before
// returning (also on failure) a sender withdraws what was not taken and waits for copies in
// progress, so no peer ever reads memory the sender may free.
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>

#include "comm/backends.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::comm {

class loopback_world {
 public:
  explicit loopback_world(int size)
      : size_(size),
        queues_(static_cast<std::size_t>(size * size)),
        dead_(size, false),
        stopping_(static_cast<std::size_t>(size)) {}

  struct message {
    const std::byte* data;
    std::size_t bytes;
    int receiver;
    enum class state { posted, copying, done, failed } status = state::posted;
    std::string failure;
  };

  int size() const { return size_; }
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<std::shared_ptr<message>>& queue(int src, int dst) {
    return queues_[static_cast<std::size_t>(src * size_ + dst)];
  }
  bool dead(int rank) const { return dead_[static_cast<std::size_t>(rank)]; }
  // Why `rank`'s communicator was aborted (its rank is stopping); empty while it is not. Under mutex.
  const std::string& stopping(int rank) const { return stopping_[static_cast<std::size_t>(rank)]; }
  void set_stopping(int rank, const std::string& why) {
    {
      std::lock_guard lock(mutex);
      stopping_[static_cast<std::size_t>(rank)] = why.empty() ? "aborted" : why;
    }
    cv.notify_all();
  }
  // A new communicator of `rank` (a new generation) is not stopping.
  void clear_stopping(int rank) {
    std::lock_guard lock(mutex);
    stopping_[static_cast<std::size_t>(rank)].clear();
  }
  void set_dead(int rank) {
    {
      std::lock_guard lock(mutex);
      dead_[static_cast<std::size_t>(rank)] = true;
    }
    cv.notify_all();
  }

 private:
  int size_;
  std::vector<std::deque<std::shared_ptr<message>>> queues_;
  std::vector<bool> dead_;
  std::vector<std::string> stopping_;
};

std::shared_ptr<loopback_world> make_loopback_world(int size) {
  if (size <= 0) fail(errc::invalid_argument, "loopback world: size must be > 0, got {}", size);
  return std::make_shared<loopback_world>(size);
}

void mark_dead(loopback_world& world, int rank) {
  world.set_dead(rank);
}

namespace {

using message = loopback_world::message;
using clock = std::chrono::steady_clock;

class loopback_transport final : public transport {
 public:
  loopback_transport(int rank, std::shared_ptr<loopback_world> world, options opts)
      : transport(rank, world->size()), world_(std::move(world)), opts_(opts) {
    world_->clear_stopping(rank);
  }

  backend kind() const noexcept override { return backend::loopback; }
  capabilities caps() const noexcept override {
    return {.host_complete = true, .background_safe = true, .host_memory = true};
  }

  void run(std::span<const op> ops) override {
    auto& w = *world_;
    if (stream() != nullptr) stream()->synchronize(opts_.timeout);  // earlier stream work fills the sends
    const auto deadline = deadline_after(opts_.timeout);
    std::vector<std::shared_ptr<message>> sent;
    {
      std::lock_guard lock(w.mutex);
      if (w.dead(rank())) fail(errc::peer_failure, "loopback rank {}: this rank was marked dead", rank());
      check_aborted();
      for (const auto& o : ops) {
        if (!o.is_send) continue;
        sent.push_back(std::make_shared<message>(message{o.data, o.bytes, o.peer}));
        w.queue(rank(), o.peer).push_back(sent.back());
      }
    }
    w.cv.notify_all();
    try {
      for (const auto& o : ops) {
        if (!o.is_send) receive(o, deadline);
      }
      await_sends(sent, deadline);
    } catch (...) {
      withdraw(sent);
      throw;
    }
  }

 private:
  // abort(): waits wake through the world's condition variable and end here.
  void on_abort(const std::string& why) noexcept override {
    try {
      world_->set_stopping(rank(), why);
    } catch (...) {  // NOLINT(bugprone-empty-catch): out of memory; this rank's own waits still see the flag
      world_->cv.notify_all();
    }
  }
  void check_aborted() const {
    if (abort_requested()) fail(errc::cancelled, "loopback rank {}: aborted ({})", rank(), abort_reason());
  }
  // Under the world's mutex, once a wait for `peer` found nothing: why the peer is gone.
  [[noreturn]] void peer_gone(int peer) const {
    check_aborted();
    const auto& why = world_->stopping(peer);
    if (!why.empty()) fail(errc::peer_failure, "loopback rank {}: peer rank {} is stopping ({})", rank(), peer, why);
    fail(errc::peer_failure, "loopback rank {}: peer rank {} died", rank(), peer);
  }

  void receive(const op& o, clock::time_point deadline) {
    auto& w = *world_;
    std::unique_lock lock(w.mutex);
    auto& q = w.queue(o.peer, rank());
    if (!w.cv.wait_until(lock, deadline, [&] {
          return !q.empty() || w.dead(o.peer) || !w.stopping(o.peer).empty() || abort_requested();
        })) {
      fail(errc::timeout, "loopback rank {}: no message from rank {} within {} ms", rank(), o.peer,
           opts_.timeout.count());
    }
    check_aborted();
    if (q.empty()) peer_gone(o.peer);
    auto m = q.front();
    q.pop_front();
    if (m->bytes != o.bytes) {
      m->status = message::state::failed;
      m->failure =
          fmt::format("rank {} expected {} bytes from rank {}, which sent {}", rank(), o.bytes, o.peer, m->bytes);
      w.cv.notify_all();
      fail(errc::invalid_argument, "loopback: {}", m->failure);
    }
    m->status = message::state::copying;
    lock.unlock();
    if (o.bytes != 0) std::memcpy(o.data, m->data, o.bytes);
    lock.lock();
    m->status = message::state::done;
    w.cv.notify_all();
  }

  void await_sends(const std::vector<std::shared_ptr<message>>& sent, clock::time_point deadline) {
    auto& w = *world_;
    std::unique_lock lock(w.mutex);
    for (const auto& m : sent) {
      const int peer = m->receiver;
      if (!w.cv.wait_until(lock, deadline, [&] {
            return m->status == message::state::done || m->status == message::state::failed || w.dead(peer) ||
                   !w.stopping(peer).empty() || abort_requested();
          })) {
        fail(errc::timeout, "loopback rank {}: rank {} did not receive within {} ms", rank(), peer,
             opts_.timeout.count());
      }
      if (m->status == message::state::failed) fail(errc::invalid_argument, "loopback: {}", m->failure);
      if (m->status != message::state::done) peer_gone(peer);
    }
  }

  void withdraw(const std::vector<std::shared_ptr<message>>& sent) noexcept {
    auto& w = *world_;
    std::unique_lock lock(w.mutex);
    for (int peer = 0; peer < w.size(); ++peer) {
      auto& q = w.queue(rank(), peer);
      std::erase_if(q, [&](const auto& m) { return std::find(sent.begin(), sent.end(), m) != sent.end(); });
    }
    // A receiver copying right now finishes its memcpy quickly; wait for it before the caller may
    // free the buffer.
    w.cv.wait(lock, [&] {
      return std::none_of(sent.begin(), sent.end(), [](const auto& m) { return m->status == message::state::copying; });
    });
  }

  std::shared_ptr<loopback_world> world_;
  options opts_;
};

}  // namespace

std::unique_ptr<transport> make_loopback(const setup& s) {
  if (!s.world) fail(errc::invalid_argument, "loopback communicator: setup.world is missing (make_loopback_world)");
  if (s.world->size() != s.size) {
    fail(errc::invalid_argument, "loopback communicator: world has {} ranks, setup.size is {}", s.world->size(),
         s.size);
  }
  return std::make_unique<loopback_transport>(s.rank, s.world, s.opts);
}

}  // namespace eplb::comm

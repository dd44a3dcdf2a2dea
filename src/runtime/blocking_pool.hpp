// Threads for calls that block (the store collectives of a rebalance, the commit agreement's rounds,
// remaking a communicator), so that the io_context's thread never does. The pool is bounded: it
// starts a thread only when a job finds none idle, up to `max_threads`; past that, jobs queue.
// job_chain runs one caller's jobs in order, one at a time, on the pool.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace eplb::runtime {

class blocking_pool {
 public:
  explicit blocking_pool(int max_threads);
  ~blocking_pool();  // stop()
  blocking_pool(const blocking_pool&) = delete;
  blocking_pool& operator=(const blocking_pool&) = delete;

  /// Queues `job` for the next free thread. A job reports its own errors (an exception escaping
  /// one is a bug: std::terminate). errc::cancelled after stop().
  void post(std::function<void()> job);
  /// Runs every queued job, then joins the threads. Bounded because every job is: each blocking
  /// call eplb makes has a timeout. Idempotent, never throws; not from a job of this pool.
  void stop() noexcept;
  /// Threads started so far (at most max_threads).
  [[nodiscard]] std::size_t threads();

 private:
  void loop();

  std::size_t max_threads_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::size_t idle_ = 0;  // threads waiting for a job
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

/// One caller's jobs, run in the order posted and one at a time, on a pool thread (which the chain
/// holds while it has jobs queued). Shared: a queued drain keeps the chain alive.
class job_chain : public std::enable_shared_from_this<job_chain> {
 public:
  explicit job_chain(blocking_pool& pool) : pool_(pool) {}
  [[nodiscard]] static std::shared_ptr<job_chain> make(blocking_pool& pool) {
    return std::make_shared<job_chain>(pool);
  }

  void post(std::function<void()> job);
  /// Nothing queued and no job running.
  [[nodiscard]] bool idle();
  /// Blocks until idle(); bounded as the jobs are.
  void wait_idle();

 private:
  void drain();

  blocking_pool& pool_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool running_ = false;  // a drain is queued or running on the pool
};

}  // namespace eplb::runtime

#include "runtime/blocking_pool.hpp"

#include "util/fail.hpp"

namespace eplb::runtime {
namespace {

// A job reports its own errors; one that escapes is a bug, and noexcept makes it terminate here
// rather than vanish.
void run_job(std::function<void()>& job) noexcept {
  job();
}

}  // namespace

blocking_pool::blocking_pool(int max_threads) : max_threads_(static_cast<std::size_t>(max_threads)) {
  if (max_threads < 1) fail(errc::invalid_argument, "blocking pool: needs at least one thread, got {}", max_threads);
}

blocking_pool::~blocking_pool() {
  stop();
}

void blocking_pool::post(std::function<void()> job) {
  std::lock_guard lock(mutex_);
  if (stopping_) fail(errc::cancelled, "blocking pool: stopped");
  jobs_.push_back(std::move(job));
  // More jobs waiting than idle threads to take them: start one, while the bound allows.
  if (jobs_.size() > idle_ && threads_.size() < max_threads_) {
    threads_.emplace_back([this] { loop(); });
  } else {
    cv_.notify_one();
  }
}

void blocking_pool::loop() {
  std::unique_lock lock(mutex_);
  for (;;) {
    ++idle_;
    cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
    --idle_;
    if (jobs_.empty()) return;  // stopping, and every queued job has run
    auto job = std::move(jobs_.front());
    jobs_.pop_front();
    lock.unlock();
    run_job(job);
    job = nullptr;  // its captures go outside the lock
    lock.lock();
  }
}

void blocking_pool::stop() noexcept {
  {
    std::lock_guard lock(mutex_);
    if (stopping_ && threads_.empty()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  // No thread is started once stopping_ is set, so threads_ no longer changes.
  for (auto& t : threads_) t.join();
  std::lock_guard lock(mutex_);
  threads_.clear();
}

std::size_t blocking_pool::threads() {
  std::lock_guard lock(mutex_);
  return threads_.size();
}

void job_chain::post(std::function<void()> job) {
  std::lock_guard lock(mutex_);
  jobs_.push_back(std::move(job));
  if (running_) return;  // the drain in progress takes it
  try {
    pool_.post([self = shared_from_this()] { self->drain(); });
  } catch (...) {
    jobs_.pop_back();  // never runs: the caller hears why
    throw;
  }
  running_ = true;
}

bool job_chain::idle() {
  std::lock_guard lock(mutex_);
  return !running_;
}

void job_chain::wait_idle() {
  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return !running_; });
}

void job_chain::drain() {
  std::unique_lock lock(mutex_);
  while (!jobs_.empty()) {
    auto job = std::move(jobs_.front());
    jobs_.pop_front();
    lock.unlock();
    run_job(job);
    job = nullptr;
    lock.lock();
  }
  running_ = false;
  cv_.notify_all();
}

}  // namespace eplb::runtime

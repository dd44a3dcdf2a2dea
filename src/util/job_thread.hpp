// A thread that runs posted jobs in order; the destructor runs what is queued, then joins.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace eplb {

class job_thread {
 public:
  job_thread() : thread_([this] { loop(); }) {}
  ~job_thread() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  job_thread(const job_thread&) = delete;
  job_thread& operator=(const job_thread&) = delete;

  /// Nothing queued and no job running.
  [[nodiscard]] bool idle() {
    std::lock_guard lock(mutex_);
    return jobs_.empty() && !running_;
  }

  void post(std::function<void()> job) {
    {
      std::lock_guard lock(mutex_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // stopping, and every queued job has run
        job = std::move(jobs_.front());
        jobs_.pop_front();
        running_ = true;
      }
      job();
      std::lock_guard lock(mutex_);
      running_ = false;
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  bool running_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

}  // namespace eplb

// The host backend: a stream is a worker thread running its operations in order; an event completes
// when the worker reaches it. Delays, failures and stalls can be injected per operation.
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <thread>

#include "device/event_state.hpp"
#include "util/fail.hpp"

namespace eplb::device {
namespace {

class host_event_state final : public detail::event_state {};

// Shared by all streams of one host device, so "the Nth operation" counts across them.
struct fault_plan {
  host_faults faults;
  std::atomic<std::int64_t> next_op{0};
  std::atomic<std::int64_t> fail_at{-1};
  std::mutex rng_mutex;
  std::mt19937_64 rng;
  explicit fault_plan(host_faults f) : faults(f), fail_at(f.fail_at_op), rng(f.seed) {}
  milliseconds delay() {
    if (faults.max_delay.count() <= 0) return milliseconds(0);
    std::lock_guard lock(rng_mutex);
    return milliseconds(std::uniform_int_distribution<std::int64_t>(0, faults.max_delay.count())(rng));
  }
};

class host_stream final : public stream {
 public:
  explicit host_stream(std::shared_ptr<fault_plan> plan) : plan_(std::move(plan)), worker_([this] { run(); }) {}
  ~host_stream() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    worker_.join();
    // Work that never ran fails its events rather than leaving waiters to time out.
    for (auto& op : queue_) {
      if (op.done) op.done->complete(std::make_exception_ptr(error(errc::cancelled, "host stream destroyed")));
    }
  }

  void copy(void* dst, const void* src, std::size_t bytes) override {
    // Zero bytes may come with null pointers (empty buffers): never hand those to memmove.
    enqueue({.action = [=] {
      if (bytes != 0) std::memmove(dst, src, bytes);
    }});
  }
  void fill(void* dst, std::byte value, std::size_t bytes) override {
    enqueue({.action = [=] {
      if (bytes != 0) std::memset(dst, static_cast<int>(value), bytes);
    }});
  }
  event record() override {
    auto state = std::make_shared<host_event_state>();
    enqueue({.done = state});
    return event(state);
  }
  void wait(const event& e) override {
    if (!e.valid()) fail(errc::invalid_argument, "stream::wait: the event was never recorded");
    enqueue({.wait_for = e});
  }
  void* native_handle() const noexcept override { return nullptr; }

 private:
  struct op {
    std::function<void()> action;
    std::shared_ptr<detail::event_state> done;
    event wait_for;
  };

  void enqueue(op o) {
    {
      std::lock_guard lock(mutex_);
      queue_.push_back(std::move(o));
    }
    cv_.notify_one();
  }

  bool stopping() {
    std::lock_guard lock(mutex_);
    return stopping_;
  }

  void run() {
    for (;;) {
      op o;
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (stopping_) return;
        o = std::move(queue_.front());
        queue_.pop_front();
      }
      execute(o);
    }
  }

  void execute(op& o) {
    const std::int64_t n = plan_->next_op++;
    if (n == plan_->faults.stall_at_op) {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stopping_; });
      failure_ = std::make_exception_ptr(error(errc::cancelled, "host stream destroyed while stalled"));
    }
    if (const auto d = plan_->delay(); d.count() > 0) std::this_thread::sleep_for(d);
    if (!failure_ && n == plan_->fail_at.load()) {
      failure_ =
          std::make_exception_ptr(error(errc::device, fmt::format("host stream: injected fault at operation {}", n)));
    }
    if (o.wait_for.valid()) {
      // Waiting on another stream's event: poll so that destruction can interrupt it.
      while (!o.wait_for.state()->wait_until(std::chrono::steady_clock::now() + milliseconds(10))) {
        if (stopping()) return;
      }
      if (auto f = o.wait_for.state()->failure(); f && !failure_) failure_ = f;
    }
    if (!failure_ && o.action) o.action();
    if (o.done) o.done->complete(failure_);
  }

  std::shared_ptr<fault_plan> plan_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<op> queue_;
  bool stopping_ = false;
  std::exception_ptr failure_;  // sticky, like a CUDA stream error; touched only by the worker
  std::thread worker_;
};

void free_host(std::byte* p, int) noexcept {
  std::free(p);
}

class host_device final : public device {
 public:
  explicit host_device(host_faults faults) : plan_(std::make_shared<fault_plan>(faults)) {}
  backend_kind kind() const noexcept override { return backend_kind::host; }
  int ordinal() const noexcept override { return 0; }
  std::unique_ptr<stream> create_stream() override { return std::make_unique<host_stream>(plan_); }
  void fail_after(std::int64_t ops) { plan_->fail_at = plan_->next_op.load() + ops - 1; }

 protected:
  buffer allocate_memory(std::size_t bytes, memory_kind kind) override {
    constexpr std::size_t align = 256;
    const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + align - 1) / align * align;
    auto* p = static_cast<std::byte*>(std::aligned_alloc(align, rounded));
    if (p == nullptr) fail(errc::device, "host device: cannot allocate {} bytes", bytes);
    return buffer(p, bytes, kind, 0, &free_host);
  }

 private:
  std::shared_ptr<fault_plan> plan_;
};

}  // namespace

std::unique_ptr<device> make_host_device(host_faults faults) {
  return std::make_unique<host_device>(faults);
}

void fail_host_device_after(device& d, std::int64_t ops_from_now) {
  auto* host = dynamic_cast<host_device*>(&d);
  if (host == nullptr) fail(errc::invalid_argument, "fail_host_device_after: not a host device");
  host->fail_after(ops_from_now);
}

}  // namespace eplb::device

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>

#include "device/event_state.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::device {
namespace detail {

void event_state::complete(std::exception_ptr failure) noexcept {
  std::vector<std::function<void(std::exception_ptr)>> callbacks;
  {
    std::lock_guard lock(mutex_);
    if (done_) return;
    done_ = true;
    failure_ = failure;
    callbacks.swap(callbacks_);
  }
  cv_.notify_all();
  for (auto& fn : callbacks) fn(failure);
}

bool event_state::done() const {
  std::lock_guard lock(mutex_);
  return done_;
}

std::exception_ptr event_state::failure() const {
  std::lock_guard lock(mutex_);
  return failure_;
}

void event_state::add_callback(std::function<void(std::exception_ptr)> fn) {
  std::unique_lock lock(mutex_);
  if (!done_) {
    callbacks_.push_back(std::move(fn));
    return;
  }
  const auto failure = failure_;
  lock.unlock();
  fn(failure);
}

bool event_state::wait_until(std::chrono::steady_clock::time_point deadline) const {
  std::unique_lock lock(mutex_);
  return cv_.wait_until(lock, deadline, [&] { return done_; });
}

}  // namespace detail

bool event::query() const {
  if (!state_) fail(errc::invalid_argument, "event::query: the event was never recorded");
  if (!state_->poll()) return false;
  if (auto failure = state_->failure()) std::rethrow_exception(failure);
  return true;
}

void event::wait(milliseconds timeout) const {
  if (!state_) fail(errc::invalid_argument, "event::wait: the event was never recorded");
  const auto deadline = deadline_after(timeout);
  // The host-side flag wakes us at once; polling in growing steps covers backends whose driver
  // knows about completion (or failure) before the flag is set.
  auto step = std::chrono::microseconds(50);
  while (!state_->poll()) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      fail(errc::timeout, "device event not complete after {} ms (stream stalled or too slow)", timeout.count());
    }
    state_->wait_until(std::min(deadline, now + step));
    step = std::min(step * 2, std::chrono::microseconds(2000));
  }
  if (auto failure = state_->failure()) std::rethrow_exception(failure);
}

bool event::wait_for(std::chrono::microseconds slice) const {
  if (!state_) fail(errc::invalid_argument, "event::wait_for: the event was never recorded");
  if (!state_->poll() && !state_->wait_until(std::chrono::steady_clock::now() + slice) && !state_->poll()) return false;
  if (auto failure = state_->failure()) std::rethrow_exception(failure);
  return true;
}

void event::notify(std::function<void(std::exception_ptr)> fn) const {
  if (!state_) fail(errc::invalid_argument, "event::notify: the event was never recorded");
  state_->add_callback(std::move(fn));
}

void stream::copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
                     std::size_t height) {
  for (std::size_t i = 0; i < height; ++i)
    copy(static_cast<std::byte*>(dst) + i * dst_pitch, static_cast<const std::byte*>(src) + i * src_pitch, width);
}

std::string_view to_string(backend_kind kind) noexcept {
  return kind == backend_kind::cuda ? "cuda" : "host";
}

backend_kind parse_backend_kind(std::string_view name) {
  if (name == "host") return backend_kind::host;
  if (name == "cuda") return backend_kind::cuda;
  fail(errc::invalid_argument, "device: unknown device backend \"{}\" (allowed: host, cuda)", name);
}

// Released buffers wait here, each with the events after which nothing touches it any more.
struct device::release_list {
  struct entry {
    buffer memory;
    std::vector<event> after;
  };
  mutable std::mutex mutex;
  std::vector<entry> waiting;
};

namespace {

// True once every event has completed (failed counts). A backend that cannot answer (its query
// throws something other than the work's failure) is asked again later.
bool ended(const std::vector<event>& after) noexcept {
  return std::all_of(after.begin(), after.end(), [](const event& e) {
    if (!e.valid()) return true;
    try {
      return e.state()->poll();
    } catch (...) {
      return false;
    }
  });
}

// Buffers whose work never ended stay allocated, reachable from here, until the process exits.
struct graveyard {
  std::mutex mutex;
  std::vector<buffer> kept;
  std::atomic<std::size_t> bytes{0};
};
graveyard& kept_for_good() {
  static auto* g = new graveyard;  // never destroyed: exit-time destructors must not free them either
  return *g;
}
}  // namespace

void keep_for_good(buffer b) noexcept {
  auto& g = kept_for_good();
  g.bytes += b.size();
  try {
    std::lock_guard lock(g.mutex);
    g.kept.push_back(std::move(b));
  } catch (...) {
    (void)new buffer(std::move(b));  // out of memory: still never freed
  }
}

device::device() : released_(std::make_unique<release_list>()) {}

std::unique_ptr<stream> device::wrap_stream(void* /*native*/) {
  fail(errc::invalid_argument, "wrap_stream: this device has no native streams (only CUDA devices do)");
}

bool device::is_device_memory(const void* /*p*/) const noexcept {
  return true;  // host memory is all the host device has
}

event device::wrap_event(void* /*native*/) {
  fail(errc::invalid_argument, "wrap_event: this device has no native events (only CUDA devices do)");
}

device::~device() {
  // Work on released memory normally ends within moments (host streams are usually gone by now,
  // their work done or cancelled; a CUDA stream has just run its last event): it gets a short
  // grace period. What still runs after it (a stalled stream) keeps its memory for good, rather
  // than this destructor hanging or freeing memory under it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  while (collect_released() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  std::lock_guard lock(released_->mutex);
  for (auto& e : released_->waiting) keep_for_good(std::move(e.memory));
}

void device::release_after(buffer b, std::vector<event> after) noexcept {
  if (b.data() == nullptr) return;
  if (ended(after)) return;  // nothing in flight touches it: `b` is freed here
  try {
    std::lock_guard lock(released_->mutex);
    released_->waiting.push_back({std::move(b), std::move(after)});
  } catch (...) {
    keep_for_good(std::move(b));
  }
  (void)collect_released();
}

void device::release_after(buffer b, stream& s) noexcept {
  if (b.data() == nullptr) return;
  std::vector<event> after;
  try {
    after.push_back(s.record());
  } catch (...) {
    keep_for_good(std::move(b));  // a stream that cannot record may still run what it holds
    return;
  }
  release_after(std::move(b), std::move(after));
}

std::size_t device::collect_released() noexcept {
  std::lock_guard lock(released_->mutex);
  // Erasing frees each ended entry's memory (no allocation here, so nothing can throw).
  std::erase_if(released_->waiting, [](const release_list::entry& e) { return ended(e.after); });
  return released_->waiting.size();
}

std::size_t device::releases_waiting() const noexcept {
  std::lock_guard lock(released_->mutex);
  return released_->waiting.size();
}

std::size_t leaked_bytes() noexcept {
  return kept_for_good().bytes.load();
}

std::unique_ptr<device> make_device(backend_kind kind, int ordinal) {
  return kind == backend_kind::cuda ? make_cuda_device(ordinal) : make_host_device();
}

}  // namespace eplb::device

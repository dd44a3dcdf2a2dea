#include <algorithm>
#include <thread>

#include "device/event_state.hpp"
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
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + timeout;
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

std::unique_ptr<device> make_device(backend_kind kind, int ordinal) {
  return kind == backend_kind::cuda ? make_cuda_device(ordinal) : make_host_device();
}

}  // namespace eplb::device

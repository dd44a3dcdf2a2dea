#include "runtime/awaitables.hpp"

#include "util/fail.hpp"

namespace eplb::runtime {

using clock = std::chrono::steady_clock;

asio::awaitable<void> await_event(asio::io_context& io, std::shared_ptr<post_gate> gate, device::event e,
                                  std::chrono::milliseconds timeout, std::string what) {
  auto timer = std::make_shared<asio::steady_timer>(io, timeout);
  auto result = std::make_shared<std::pair<bool, std::exception_ptr>>(false, nullptr);
  // The callback runs, and is destroyed, on a stream or driver thread, maybe after the io_context is
  // gone: it holds the timer weakly, and only the posted handler (on the io thread) touches it.
  e.notify([g = gate, weak = std::weak_ptr<asio::steady_timer>(timer), result](std::exception_ptr f) {
    g->post([weak, result, f] {
      *result = {true, f};
      if (auto t = weak.lock()) t->cancel();
    });
  });
  co_await timer->async_wait(asio::as_tuple(asio::use_awaitable));
  if (!result->first) fail(errc::timeout, "{} not done within {} ms", what, timeout.count());
  if (result->second) std::rethrow_exception(result->second);
}

staging_ring::staging_ring(asio::io_context& io, std::shared_ptr<post_gate> gate, int areas,
                           std::chrono::milliseconds timeout)
    : io_(io), gate_(std::move(gate)), timeout_(timeout) {
  for (int i = 0; i < areas; ++i) free_.push_back(i);
  consumed_.resize(static_cast<std::size_t>(areas));
}

asio::awaitable<int> staging_ring::acquire() {
  while (free_.empty()) {
    if (cancelled_) fail(errc::cancelled, "{}", reason_);
    waiter_ = std::make_shared<asio::steady_timer>(io_, clock::time_point::max());
    auto keep = waiter_;
    co_await keep->async_wait(asio::as_tuple(asio::use_awaitable));
  }
  const int a = free_.front();
  free_.pop_front();
  if (consumed_[static_cast<std::size_t>(a)].valid()) {
    std::string what = "the serving stream's read of a staging area";
    co_await await_event(io_, gate_, consumed_[static_cast<std::size_t>(a)], timeout_, std::move(what));
  }
  co_return a;
}

void staging_ring::release(int area, device::event consumed) {
  consumed_[static_cast<std::size_t>(area)] = std::move(consumed);
  free_.push_back(area);
  if (waiter_) waiter_->cancel();
}

void staging_ring::cancel(std::string reason) {
  cancelled_ = true;
  reason_ = std::move(reason);
  if (waiter_) waiter_->cancel();
}

void staging_ring::reset() {
  free_.clear();
  for (int i = 0; i < static_cast<int>(consumed_.size()); ++i) free_.push_back(i);
  cancelled_ = false;
}

}  // namespace eplb::runtime

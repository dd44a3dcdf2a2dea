#include "runtime/awaitables.hpp"

#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::runtime {
namespace {

using clock = std::chrono::steady_clock;
using wait_handler = asio::any_completion_handler<void(std::exception_ptr)>;

template <typename... Args>
std::exception_ptr make_error(errc code, fmt::format_string<Args...> f, Args&&... args) {
  return std::make_exception_ptr(error(code, fmt::format(f, std::forward<Args>(args)...)));
}

// One wait of async_wait_report. Every outcome (the report, a cancellation) is recorded once and
// cancels the timer; the timer's handler, on the io thread, completes the wait. So the awaiting
// coroutine always resumes from a handler of its own, and the timeout is that same timer expiring.
struct report_wait {
  report_wait(asio::io_context& io, wait_options o, wait_handler h)
      : timer(io, o.timeout ? deadline_after(*o.timeout) : clock::time_point::max()),
        opts(std::move(o)),
        handler(std::move(h)) {}

  void settle(std::exception_ptr outcome) {
    if (settled) return;  // a late report, or one after a cancellation
    settled = true;
    result = std::move(outcome);
    timer.cancel();
  }

  void complete() {
    if (!settled) {  // the timer expired; without a timeout it never does
      result = opts.timeout ? make_error(errc::timeout, "{} not done within {} ms", opts.what, opts.timeout->count())
                            : make_error(errc::internal, "{}: a wait without a timeout expired", opts.what);
      settled = true;
    }
    auto slot = handler.get_cancellation_slot();
    if (slot.is_connected()) slot.clear();
    std::move(handler)(result);
  }

  asio::steady_timer timer;
  wait_options opts;
  wait_handler handler;
  bool settled = false;
  std::exception_ptr result;
};

void watch_cancellation(const std::shared_ptr<report_wait>& w) {
  auto slot = w->handler.get_cancellation_slot();
  if (!w->opts.cancellable || !slot.is_connected()) return;
  // The slot lives in the awaiting coroutine, which the wait's handler owns: held weakly, so the
  // two never keep each other alive.
  slot.assign([weak = std::weak_ptr<report_wait>(w)](asio::cancellation_type type) {
    if ((type & (asio::cancellation_type::terminal | asio::cancellation_type::partial)) ==
        asio::cancellation_type::none) {
      return;
    }
    if (auto p = weak.lock()) {
      p->settle(make_error(errc::cancelled, "{} cancelled", p->opts.what));
    }
  });
}

}  // namespace

void detail::start_report_wait(asio::io_context& io, std::shared_ptr<post_gate> gate,
                               std::function<void(report_fn)> start, wait_options opts, wait_handler handler) {
  auto w = std::make_shared<report_wait>(io, std::move(opts), std::move(handler));
  watch_cancellation(w);
  // Waiting first, so that an outcome recorded below (a report or a failed start) cancels it.
  w->timer.async_wait([w](boost::system::error_code) { w->complete(); });
  // The report may run, and be destroyed, on another thread after the io_context is gone: it holds
  // the wait weakly, and only the handler posted through the gate (on the io thread) touches it.
  report_fn report = [g = std::move(gate), weak = std::weak_ptr<report_wait>(w)](std::exception_ptr f) {
    g->post([weak, f] {
      if (auto p = weak.lock()) p->settle(f);
    });
  };
  try {
    start(std::move(report));
  } catch (...) {
    w->settle(std::current_exception());
  }
}

asio::awaitable<void> await_event(asio::io_context& io, std::shared_ptr<post_gate> gate, device::event e,
                                  std::chrono::milliseconds timeout, std::string what) {
  std::function<void(report_fn)> start = [e](report_fn report) { e.notify(std::move(report)); };
  return async_wait_report(io, std::move(gate), std::move(start), {std::move(what), timeout}, asio::use_awaitable);
}

asio::awaitable<void> poll_event(asio::io_context& io, device::event e, std::chrono::milliseconds timeout,
                                 std::string what) {
  using std::chrono::microseconds;
  const auto deadline = deadline_after(timeout);
  asio::steady_timer timer(io);
  microseconds slice(50);
  while (!e.query()) {  // rethrows the failure of the work before it
    if (clock::now() >= deadline) fail(errc::timeout, "{} not done within {} ms", what, timeout.count());
    timer.expires_after(slice);
    boost::system::error_code ec;
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (ec == asio::error::operation_aborted) fail(errc::cancelled, "{} cancelled", what);
    slice = std::min(slice * 2, microseconds(1000));
  }
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
    // No timeout: release() and cancel() end this wait. (Named, not built in the co_await: GCC 12
    // mishandles braced temporaries there.)
    std::function<void(report_fn)> park = [this](report_fn report) { waiter_ = std::move(report); };
    wait_options opts{.what = "the wait for a free staging area"};
    co_await async_wait_report(io_, gate_, std::move(park), std::move(opts), asio::use_awaitable);
  }
  const int a = free_.front();
  free_.pop_front();
  if (consumed_[static_cast<std::size_t>(a)].valid()) {
    std::string what = "the serving stream's read of a staging area";
    co_await poll_event(io_, consumed_[static_cast<std::size_t>(a)], timeout_, std::move(what));
  }
  co_return a;
}

void staging_ring::wake() {
  if (auto report = std::exchange(waiter_, nullptr)) report(nullptr);
}

void staging_ring::release(int area, device::event consumed) {
  consumed_[static_cast<std::size_t>(area)] = std::move(consumed);
  free_.push_back(area);
  wake();
}

void staging_ring::cancel(std::string reason) {
  cancelled_ = true;
  reason_ = std::move(reason);
  wake();
}

void staging_ring::reset() {
  free_.clear();
  for (int i = 0; i < static_cast<int>(consumed_.size()); ++i) free_.push_back(i);
  cancelled_ = false;
}

}  // namespace eplb::runtime

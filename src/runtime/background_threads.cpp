#include "runtime/background_threads.hpp"

#include <optional>
#include <thread>

#include "runtime/awaitables.hpp"
#include "runtime/blocking_pool.hpp"
#include "util/asio.hpp"

namespace eplb::runtime {

struct background_threads::impl {
  impl(asio::io_context* external, int blocking_threads)
      : own_io(external != nullptr ? nullptr : std::make_unique<asio::io_context>()),
        io(external != nullptr ? *external : *own_io),
        pool(blocking_threads) {
    if (own_io) thread = std::thread([this] { io.run(); });
  }

  std::unique_ptr<asio::io_context> own_io;  // null when the caller runs an io_context of its own
  asio::io_context& io;
  // Keeps io.run() going while nothing is queued (and the caller's run_one_for() in tests).
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work{io.get_executor()};
  std::shared_ptr<post_gate> gate = std::make_shared<post_gate>(io);
  blocking_pool pool;
  bool stopped = false;
  std::thread thread;  // last: starts after the members it uses
};

background_threads::background_threads(int blocking_threads)
    : impl_(std::make_unique<impl>(nullptr, blocking_threads)) {}

background_threads::background_threads(asio::io_context& io, int blocking_threads)
    : impl_(std::make_unique<impl>(&io, blocking_threads)) {}

background_threads::~background_threads() {
  stop();
}

asio::io_context& background_threads::io() noexcept {
  return impl_->io;
}
const std::shared_ptr<post_gate>& background_threads::gate() const noexcept {
  return impl_->gate;
}
blocking_pool& background_threads::pool() noexcept {
  return impl_->pool;
}
bool background_threads::has_io_thread() const noexcept {
  return impl_->own_io != nullptr;
}

std::function<void(std::function<void()>)> background_threads::serial_executor() {
  return [chain = job_chain::make(impl_->pool)](std::function<void()> job) { chain->post(std::move(job)); };
}

void background_threads::stop() noexcept {
  if (impl_->stopped) return;
  impl_->stopped = true;
  impl_->gate->close();
  impl_->work.reset();
  if (impl_->thread.joinable()) {
    impl_->io.stop();
    impl_->thread.join();
  }
  impl_->pool.stop();
}

}  // namespace eplb::runtime

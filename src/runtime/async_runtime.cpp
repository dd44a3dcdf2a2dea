#include "runtime/async_runtime.hpp"

#include <condition_variable>
#include <functional>

#include "runtime/awaitables.hpp"
#include "util/asio.hpp"
#include "util/fail.hpp"
#include "util/job_thread.hpp"

namespace eplb::runtime {

using clock = std::chrono::steady_clock;

struct async_runtime::impl {
  impl(async_runtime& owner, exec::rearranger& s, const exec::rank_weights& w, cpu_group& g, device::stream& side,
       int areas, std::chrono::milliseconds t, asio::io_context* external)
      : self(owner),
        stager(s),
        weights(w),
        group(g),
        side_stream(side),
        timeout(t),
        own_io(external != nullptr ? nullptr : std::make_unique<asio::io_context>()),
        io(external != nullptr ? *external : *own_io),
        ring(io, gate, areas, t) {
    if (own_io) thread = std::thread([this] { io.run(); });
  }

  async_runtime& self;
  exec::rearranger& stager;
  const exec::rank_weights& weights;
  cpu_group& group;
  device::stream& side_stream;
  std::chrono::milliseconds timeout;

  std::unique_ptr<asio::io_context> own_io;  // null when the caller runs an io_context of its own
  asio::io_context& io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  // Device and communicator callbacks post here through the gate, which stop() closes, so a late
  // callback never touches a runtime that is gone.
  std::shared_ptr<post_gate> gate = std::make_shared<post_gate>(io);
  job_thread blocking;  // CPU collectives block on the store: they run here, not on the io thread

  // Touched only on the io thread.
  staging_ring ring;
  bool stopping = false;
  bool cancelled = false;  // cancel(): this rebalance only

  // Shared with the serving thread.
  mutable std::mutex mutex;
  std::vector<ready_layer> layers;
  std::optional<matrix<expert_id>> target;
  std::optional<matrix<double>> global_load;
  std::exception_ptr failure;
  std::mutex idle_mutex;  // with idle_cv: wait_idle() sleeps until busy_ turns false
  std::condition_variable idle_cv;

  bool stopped = false;  // stop() ran (touched by the thread that calls stop())
  std::thread thread;    // last

  // Runs `job` (which may block on the network) on the blocking worker and resumes here when it is
  // done, rethrowing its error. (A named coroutine taking a named std::function: GCC 12 mishandles
  // lambdas passed into coroutines.)
  asio::awaitable<void> on_blocking_worker(std::function<void()> job) {
    auto timer = std::make_shared<asio::steady_timer>(io, clock::time_point::max());
    auto failure = std::make_shared<std::exception_ptr>();
    // Jobs and callbacks on other threads hold the timer weakly (see await_event).
    blocking.post([g = gate, weak = std::weak_ptr<asio::steady_timer>(timer), failure, job = std::move(job)] {
      std::exception_ptr f;
      try {
        job();
      } catch (...) {
        f = std::current_exception();
      }
      g->post([weak, failure, f] {
        *failure = f;
        if (auto t = weak.lock()) t->cancel();
      });
    });
    co_await timer->async_wait(asio::as_tuple(asio::use_awaitable));
    if (*failure) std::rethrow_exception(*failure);
  }

  // The load all-reduce blocks on the store. After a failed rebalance a rank may start this about a
  // timeout after its peers (it first lets its last transfer time out), so this one wait allows
  // twice the timeout; it also lines the ranks up before anything else of the rebalance.
  asio::awaitable<std::vector<double>> allreduce(std::shared_ptr<const matrix<double>> local) {
    auto out = std::make_shared<std::vector<double>>();
    std::function<void()> job = [this, out, local] { *out = group.allreduce_sum(local->flat(), 2 * timeout); };
    co_await on_blocking_worker(std::move(job));
    co_return std::move(*out);
  }

  asio::awaitable<void> await_execute() {
    auto timer = std::make_shared<asio::steady_timer>(io, clock::time_point::max());
    auto result = std::make_shared<std::pair<bool, std::exception_ptr>>(false, nullptr);
    // The communicator enforces its own timeout; this resumes when it reports, either way.
    stager.communicator().execute_async(
        [g = gate, weak = std::weak_ptr<asio::steady_timer>(timer), result](std::exception_ptr f) {
          g->post([weak, result, f] {
            *result = {true, f};
            if (auto t = weak.lock()) t->cancel();
          });
        });
    co_await timer->async_wait(asio::as_tuple(asio::use_awaitable));
    if (result->second) std::rethrow_exception(result->second);
  }

  asio::awaitable<void> rebalance(rebalance_inputs in) {
    // Areas a failed rebalance staged but never had committed are free again.
    ring.reset();
    cancelled = false;
    const auto start = clock::now();
    const auto layers_n = static_cast<int>(in.old_map.rows());
    const auto experts = in.local_load.cols();
    const auto local = std::make_shared<const matrix<double>>(std::move(in.local_load));
    const auto summed = co_await allreduce(local);
    if (in.prepare) co_await on_blocking_worker(std::move(in.prepare));
    matrix<double> total(static_cast<std::size_t>(layers_n), experts);
    std::copy(summed.begin(), summed.end(), total.flat().begin());
    auto next = eplb::rebalance(in.policy, {total, static_cast<int>(in.old_map.cols()), in.num_groups, in.num_nodes,
                                            group.size(), &in.old_map});
    {
      std::lock_guard lock(mutex);
      target = next;
      global_load = total;
    }
    self.plan_seconds_ = std::chrono::duration<double>(clock::now() - start).count();
    for (int l = 0; l < layers_n; ++l) {
      if (stopping) fail(errc::cancelled, "rebalance cancelled by stop()");
      if (cancelled) fail(errc::cancelled, "rebalance abandoned by the serving side");
      const auto t0 = clock::now();
      const int a = co_await ring.acquire();
      auto staged = stager.queue_layer(l, weights, in.old_map.row(static_cast<std::size_t>(l)),
                                       next.row(static_cast<std::size_t>(l)), self.area(a));
      co_await await_execute();
      auto ready = side_stream.record();
      std::string what = fmt::format("staging layer {}", l);
      co_await await_event(io, gate, ready, timeout, std::move(what));
      self.stage_seconds_ = std::chrono::duration<double>(clock::now() - t0).count();
      {
        std::lock_guard lock(mutex);
        layers.push_back({std::move(staged), a, ready});
      }
      self.staged_.store(l + 1, std::memory_order_release);
    }
  }
};

async_runtime::async_runtime(exec::rearranger& stager, const exec::rank_weights& weights, cpu_group& group,
                             device::device& dev, device::stream& side, int areas, std::chrono::milliseconds timeout,
                             asio::io_context* io)
    : dev_(&dev) {
  if (areas <= 0) fail(errc::invalid_argument, "async runtime: needs at least one staging area");
  for (int i = 0; i < areas; ++i) {
    areas_.push_back(dev.allocate(stager.layer_area_bytes(), dev.kind() == device::backend_kind::cuda
                                                                 ? device::memory_kind::device
                                                                 : device::memory_kind::host));
  }
  impl_ = std::make_unique<impl>(*this, stager, weights, group, side, areas, timeout, io);
}

async_runtime::async_runtime(exec::rearranger& stager, const exec::rank_weights& weights, cpu_group& group,
                             device::device& dev, device::stream& side, int areas, std::chrono::milliseconds timeout)
    : async_runtime(stager, weights, group, dev, side, areas, timeout, nullptr) {}

async_runtime::async_runtime(exec::rearranger& stager, const exec::rank_weights& weights, cpu_group& group,
                             device::device& dev, device::stream& side, int areas, std::chrono::milliseconds timeout,
                             asio::io_context& io)
    : async_runtime(stager, weights, group, dev, side, areas, timeout, &io) {}

async_runtime::~async_runtime() {
  stop();
  // Work queued on the side stream (staging copies, a transfer's copies) and the serving stream's
  // reads of committed areas may outlive a wait that timed out: the device frees the areas once
  // both streams have passed it, and keeps them for good if that can never be known.
  std::vector<device::event> after = readers_done_;
  bool known = !readers_unknown_;
  try {
    after.push_back(impl_->side_stream.record());
  } catch (...) {
    known = false;
  }
  for (auto& a : areas_) {
    if (known) {
      dev_->release_after(std::move(a), after);
    } else {
      device::keep_for_good(std::move(a));
    }
  }
}

void async_runtime::release_areas_after(device::stream& reader) noexcept {
  try {
    readers_done_.push_back(reader.record());
  } catch (...) {
    readers_unknown_ = true;
  }
}

void async_runtime::start(rebalance_inputs in) {
  if (busy_.exchange(true)) fail(errc::internal, "async runtime: a rebalance is already running");
  {
    std::lock_guard lock(impl_->mutex);
    impl_->layers.clear();
    impl_->target.reset();
    impl_->global_load.reset();
    impl_->failure = nullptr;
  }
  staged_ = 0;
  // The completion handler keeps every failure for step(): nothing is swallowed.
  asio::co_spawn(impl_->io, impl_->rebalance(std::move(in)), [this](std::exception_ptr e) {
    if (e) {
      std::lock_guard lock(impl_->mutex);
      impl_->failure = e;
    }
    {
      std::lock_guard lock(impl_->idle_mutex);
      busy_ = false;
    }
    impl_->idle_cv.notify_all();
  });
}

void async_runtime::cancel() {
  asio::post(impl_->io, [this] {
    impl_->cancelled = true;
    impl_->ring.cancel("rebalance abandoned by the serving side");
  });
}

bool async_runtime::wait_idle(std::chrono::milliseconds limit) {
  std::unique_lock lock(impl_->idle_mutex);
  return impl_->idle_cv.wait_for(lock, limit, [this] { return !busy_.load(std::memory_order_acquire); });
}

ready_layer async_runtime::get(int layer) const {
  std::lock_guard lock(impl_->mutex);
  if (layer < 0 || layer >= static_cast<int>(impl_->layers.size())) {
    fail(errc::internal, "async runtime: layer {} is not staged", layer);
  }
  return impl_->layers[static_cast<std::size_t>(layer)];
}

void async_runtime::release(int area, device::event consumed) {
  asio::post(impl_->io, [this, area, consumed] { impl_->ring.release(area, consumed); });
}

std::optional<matrix<expert_id>> async_runtime::target() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->target;
}

std::optional<matrix<double>> async_runtime::global_load() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->global_load;
}

std::exception_ptr async_runtime::failure() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->failure;
}

void async_runtime::stop() noexcept {
  if (!impl_ || impl_->stopped) return;
  impl_->stopped = true;
  asio::post(impl_->io, [this] {
    impl_->stopping = true;
    impl_->ring.cancel("rebalance cancelled by stop()");
  });
  impl_->work.reset();
  // The coroutine ends at its next await: transfers and device waits are bounded by the timeout.
  if (impl_->thread.joinable()) {
    impl_->thread.join();
  } else {
    // The caller's io_context (tests): run it here until the rebalance has ended.
    try {
      if (impl_->io.stopped()) impl_->io.restart();
      impl_->io.run();
    } catch (...) {
    }
  }
  try {
    impl_->side_stream.synchronize(impl_->timeout);
  } catch (...) {
    // A failed or stalled side stream is reported by step(); stop() only must not hang.
  }
  impl_->gate->close();
}

}  // namespace eplb::runtime

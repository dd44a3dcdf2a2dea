#include "runtime/async_runtime.hpp"

#include <condition_variable>
#include <functional>
#include <optional>

#include "runtime/awaitables.hpp"
#include "runtime/blocking_pool.hpp"
#include "util/asio.hpp"
#include "util/fail.hpp"

namespace eplb::runtime {

using clock = std::chrono::steady_clock;

struct async_runtime::impl {
  impl(async_runtime& owner, background_threads& th, exec::rearranger& s, const exec::rank_weights& w, cpu_group& g,
       device::stream& side, int areas, std::chrono::milliseconds t)
      : self(owner),
        threads(th),
        io(th.io()),
        gate(th.gate()),
        stager(s),
        weights(w),
        group(g),
        side_stream(side),
        timeout(t),
        ring(io, gate, areas, t) {}

  async_runtime& self;
  background_threads& threads;
  asio::io_context& io;
  // Device, communicator and pool completions post here through the gate, which the threads'
  // owner closes when it stops, so a late one never touches an io_context that is gone.
  std::shared_ptr<post_gate> gate;
  exec::rearranger& stager;
  const exec::rank_weights& weights;
  cpu_group& group;
  device::stream& side_stream;
  std::chrono::milliseconds timeout;

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
  std::mutex idle_mutex;  // with idle_cv: wait_idle() and stop() sleep until busy_ turns false
  std::condition_variable idle_cv;
  bool stop_seen = false;  // under idle_mutex: the io thread ran stop()'s handler, so all posted before it

  bool stopped = false;  // stop() ran (touched by the thread that calls stop())

  // Runs `job` (which may block on the network) on the blocking pool. async_wait_report: resumes on
  // the io thread once the job has run, rethrowing its error. Not cancellable (the job uses this
  // runtime and its group until it ends) and no timeout of its own (the job's calls have theirs).
  // Not a coroutine: GCC 12 mishandles lambdas passed into coroutines.
  asio::awaitable<void> on_pool(std::function<void()> job) {
    std::function<void(report_fn)> start = [&pool = threads.pool(), job = std::move(job)](report_fn report) {
      pool.post([job, report]() mutable {
        std::exception_ptr f;
        try {
          job();
        } catch (...) {
          f = std::current_exception();
        }
        job = nullptr;  // its captures go before the report, which may end the runtime
        report(f);
      });
    };
    return async_wait_report(io, gate, std::move(start), {.what = "a blocking job", .cancellable = false},
                             asio::use_awaitable);
  }

  // The transfers queue_layer() queued. async_wait_report on execute_async(): resumes on the io
  // thread when the communicator reports (it enforces the timeout itself), rethrowing its error. Not
  // cancellable: the transfer writes into the staging area until it reports.
  asio::awaitable<void> transfers_done() {
    // The communicator is looked up when the wait starts: `prepare` may have made it again.
    std::function<void(report_fn)> start = [this](report_fn report) {
      stager.communicator().execute_async(std::move(report));
    };
    return async_wait_report(io, gate, std::move(start), {.what = "the transfers of a layer", .cancellable = false},
                             asio::use_awaitable);
  }

  // The load all-reduce blocks on the store. After a failed rebalance a rank may start this about a
  // timeout after its peers (it first lets its last transfer time out), so this one wait allows
  // twice the timeout; it also lines the ranks up before anything else of the rebalance. On the pool
  // (on_pool: resumes on the io thread, not cancellable); errors: the group's (errc::timeout naming
  // a silent rank).
  asio::awaitable<std::vector<double>> allreduce(std::shared_ptr<const matrix<double>> local) {
    auto out = std::make_shared<std::vector<double>>();
    std::function<void()> job = [this, out, local] { *out = group.allreduce_sum(local->flat(), 2 * timeout); };
    co_await on_pool(std::move(job));
    co_return std::move(*out);
  }

  // Spawned by start() on the io thread, and resumes only there. No cancellation slot is bound:
  // stop() and cancel() set flags that it checks before each layer and cancel the ring's wait, so
  // it ends between awaits, never while a transfer or job still uses its buffers. Errors: those of
  // its awaits, the policy's, errc::cancelled; finished() keeps them for step().
  asio::awaitable<void> rebalance(rebalance_inputs in) {
    // Areas a failed rebalance staged but never had committed are free again.
    ring.reset();
    cancelled = false;
    const auto start = clock::now();
    const auto layers_n = in.old_map.rows();
    const auto experts = in.local_load.cols();
    const auto local = std::make_shared<const matrix<double>>(std::move(in.local_load));
    const auto summed = co_await allreduce(local);
    if (in.prepare) co_await on_pool(std::move(in.prepare));
    matrix<double> total(layers_n, experts);
    std::copy(summed.begin(), summed.end(), total.flat().begin());
    auto next = eplb::rebalance(in.policy, {total, static_cast<int>(in.old_map.cols()), in.num_groups, in.num_nodes,
                                            group.size(), &in.old_map});
    keep_masked_out(next, in.old_map, static_cast<int>(experts));
    if (in.accept && !in.accept(total, in.old_map, next)) {
      next = in.old_map;
      self.skipped_.store(true, std::memory_order_release);
    }
    {
      std::lock_guard lock(mutex);
      target = next;
      global_load = total;
    }
    self.plan_seconds_ = std::chrono::duration<double>(clock::now() - start).count();
    for (int l = 0; l < static_cast<int>(layers_n); ++l) co_await stage_layer(l, in.old_map, next);
  }

  // One layer: an area, the transfers into it, the side stream's copies. Resumes on the io thread;
  // errors: errc::cancelled (the flags, the ring), the transfers', the side stream's or errc::timeout
  // naming the layer. `old_map` and `next` live in rebalance()'s frame, which awaits this.
  asio::awaitable<void> stage_layer(int l, const matrix<expert_id>& old_map, const matrix<expert_id>& next) {
    if (stopping) fail(errc::cancelled, "rebalance cancelled by stop()");
    if (cancelled) fail(errc::cancelled, "rebalance abandoned by the serving side");
    const auto t0 = clock::now();
    const int a = co_await ring.acquire();
    const auto row = static_cast<std::size_t>(l);
    auto staged = stager.queue_layer(l, weights, old_map.row(row), next.row(row), self.area(a));
    co_await transfers_done();
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

  // The rebalance coroutine's completion handler, on the io thread: keeps every failure for
  // step(), so nothing is swallowed.
  void finished(const std::exception_ptr& e) {
    if (e) {
      std::lock_guard lock(mutex);
      failure = e;
    }
    // Notified under the lock: stop() may destroy the runtime as soon as it sees busy_ false.
    std::lock_guard lock(idle_mutex);
    self.busy_ = false;
    idle_cv.notify_all();
  }

  // Until stop()'s handler has run (so every handler posted before it) and the rebalance ended.
  void wait_stopped() {
    std::unique_lock lock(idle_mutex);
    const auto done = [this] { return stop_seen && !self.busy(); };
    if (threads.has_io_thread()) {
      idle_cv.wait(lock, done);
      return;
    }
    // The caller's io_context (tests): run it here.
    while (!done()) {
      lock.unlock();
      try {
        if (io.stopped()) io.restart();
        io.run_one_for(std::chrono::milliseconds(10));
      } catch (...) {  // NOLINT(bugprone-empty-catch): a test's handler; stop() must not throw
      }
      lock.lock();
    }
  }
};

async_runtime::async_runtime(background_threads& threads, exec::rearranger& stager, const exec::rank_weights& weights,
                             cpu_group& group, device::device& dev, device::stream& side, int areas,
                             std::chrono::milliseconds timeout)
    : dev_(&dev) {
  if (areas <= 0) fail(errc::invalid_argument, "async runtime: needs at least one staging area");
  for (int i = 0; i < areas; ++i) {
    areas_.push_back(dev.allocate(stager.layer_area_bytes(), dev.kind() == device::backend_kind::cuda
                                                                 ? device::memory_kind::device
                                                                 : device::memory_kind::host));
  }
  impl_ = std::make_unique<impl>(*this, threads, stager, weights, group, side, areas, timeout);
}

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
  skipped_ = false;
  asio::co_spawn(impl_->io, impl_->rebalance(std::move(in)), [this](std::exception_ptr e) { impl_->finished(e); });
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
  // The rebalance ends at its next check or area wait; transfers and device waits are bounded by
  // the timeout.
  asio::post(impl_->io, [this] {
    impl_->stopping = true;
    impl_->ring.cancel("rebalance cancelled by stop()");
    std::lock_guard lock(impl_->idle_mutex);
    impl_->stop_seen = true;
    impl_->idle_cv.notify_all();
  });
  impl_->wait_stopped();
  try {
    // Short: the areas go through release_after() in the destructor, so nothing here must finish.
    impl_->side_stream.synchronize(std::min(impl_->timeout, std::chrono::milliseconds(100)));
  } catch (...) {
    // A failed or stalled side stream is reported by step(); stop() only must not hang.
  }
}

}  // namespace eplb::runtime

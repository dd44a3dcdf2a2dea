// Issue 17 item 3 and issue 18 item 2: the load window read from a cumulative counter buffer and
// the engine's own buffers, on the host device. The window a rebalance plans from is compared with
// the counts the test wrote (int64 and wrapping int32 counters, host counts, dummy steps, a window
// longer than the interval, a late rebalance); what each step queues on the serving stream is
// counted (quiet steps: nothing; never a record(), whose CUDA form queues a host function); the
// engine's int64 maps are compared with the host maps after every rebalance.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>

#include "check_error.hpp"
#include "eplb/state.hpp"
#include "state/load_recorder.hpp"
#include "tools/exchange.hpp"

using namespace eplb;
using namespace std::chrono_literals;

namespace {

// A serving stream that counts what is queued on it and forwards it to a host stream.
class counting_stream final : public device::stream {
 public:
  explicit counting_stream(device::device& dev) : inner_(dev.create_stream()) {}
  void copy(void* dst, const void* src, std::size_t bytes) override {
    ++copies;
    inner_->copy(dst, src, bytes);
  }
  void copy_2d(void* dst, std::size_t dp, const void* src, std::size_t sp, std::size_t w, std::size_t h) override {
    ++copies;
    inner_->copy_2d(dst, dp, src, sp, w, h);
  }
  void fill(void* dst, std::byte value, std::size_t bytes) override {
    ++fills;
    inner_->fill(dst, value, bytes);
  }
  device::event record() override {
    ++records;
    return inner_->record();
  }
  device::event mark() override {
    ++marks;
    return inner_->mark();
  }
  void wait(const device::event& e) override {
    ++waits;
    inner_->wait(e);
  }
  [[nodiscard]] void* native_handle() const noexcept override { return nullptr; }
  [[nodiscard]] int total() const { return copies + fills + records + marks + waits; }

  std::atomic<int> copies{0}, fills{0}, records{0}, marks{0}, waits{0};

 private:
  std::unique_ptr<device::stream> inner_;
};

// The counts of one step: distinct per step, layer and slot.
std::int64_t count_at(int step, std::size_t i) {
  return 1 + (static_cast<std::int64_t>(step) * 7 + static_cast<std::int64_t>(i) * 13) % 50;
}

// Adds step `step`'s counts to the counters at `buffer` (int32 or int64, wrapping), as a router
// would; the stream must be idle (the test synchronizes it first).
void add_step(void* buffer, element_type type, std::size_t n, int step) {
  for (std::size_t i = 0; i < n; ++i) {
    if (type == element_type::int32) {
      auto* p = static_cast<std::uint32_t*>(buffer) + i;
      *p = static_cast<std::uint32_t>(*p + static_cast<std::uint32_t>(count_at(step, i)));
    } else {
      static_cast<std::int64_t*>(buffer)[i] += count_at(step, i);
    }
  }
}

// The window of steps [first, last] as the test wrote it (dummy steps included: their device
// counts are counted).
std::vector<std::int64_t> expected_window(std::size_t n, int first, int last) {
  std::vector<std::int64_t> w(n, 0);
  for (int s = std::max(1, first); s <= last; ++s) {
    for (std::size_t i = 0; i < n; ++i) w[i] += count_at(s, i);
  }
  return w;
}

std::vector<std::int64_t> flat(const matrix<std::int64_t>& m) {
  return {m.flat().begin(), m.flat().end()};
}

}  // namespace

TEST_CASE("load recorder: windows longer than the interval, a late rebalance, wrapping int32 counters") {
  auto dev = device::make_host_device();
  counting_stream serving(*dev);
  const int layers = 2, slots = 3, window = 25, interval = 10;
  const std::size_t n = layers * slots;
  for (const auto type : {element_type::int64, element_type::int32}) {
    CAPTURE(static_cast<int>(type));
    auto engine = dev->allocate(n * 8, device::memory_kind::host);
    // int32 counters start just below 2^32: they wrap inside the first windows.
    std::memset(engine.data(), 0, engine.size());
    for (std::size_t i = 0; i < n && type == element_type::int32; ++i) {
      reinterpret_cast<std::uint32_t*>(engine.data())[i] = 0xFFFFFF00U;
    }
    state_detail::load_recorder rec(*dev, serving, {layers, slots, window, interval},
                                    engine_buffer{engine.data(), type}, 5s);
    CHECK(rec.buffer() == (type == element_type::int64 ? reinterpret_cast<std::int64_t*>(engine.data()) : nullptr));
    // Due at 2, 12, 22, 32, then late: 45 instead of 42, and 55 after it.
    std::int64_t due = 2;
    rec.expect_rebalance_at(due, 0);
    int windows = 0;
    for (int step = 1; step <= 56; ++step) {
      serving.synchronize(5s);
      add_step(engine.data(), type, n, step);
      const int before = serving.total(), records = serving.records;
      rec.end_step(step, false);
      if (step == 42 || step == 43 || step == 44) continue;  // the previous rebalance still in flight
      if (step < due) continue;
      rec.begin_window(step);
      CHECK(serving.total() - before >= 2);  // its reading: one copy and one mark, no record
      CHECK(serving.records == records);
      const auto& got = rec.finish_window();
      // A window reaching back before step 1 starts at the first step. The late one (45) starts
      // from the reading taken for the one due at 42 (step 17), so it is 3 steps longer; with a
      // window longer than the interval the next one (55) is too: its start (30) had passed when
      // the delay moved it, and the reading before it is step 27's.
      const int first = step == 45 ? 18 : step == 55 ? 28 : step - window + 1;
      CHECK_MESSAGE(flat(got) == expected_window(n, first, step), "window of step ", step);
      ++windows;
      due = step + interval;
      rec.expect_rebalance_at(due, step);
    }
    CHECK(windows == 6);  // 2, 12, 22, 32, 45, 55
  }
}

TEST_CASE("load recorder: host counts join the window, a dummy step's are dropped; quiet steps queue nothing") {
  auto dev = device::make_host_device();
  counting_stream serving(*dev);
  const int layers = 1, slots = 4, window = 3, interval = 8;
  state_detail::load_recorder rec(*dev, serving, {layers, slots, window, interval}, std::nullopt, 5s);
  REQUIRE(rec.buffer() != nullptr);
  rec.expect_rebalance_at(2, 0);
  std::int64_t due = 2;
  for (int step = 1; step <= 26; ++step) {
    serving.synchronize(5s);
    add_step(rec.buffer(), element_type::int64, slots, step);
    rec.record_host(0, std::vector<std::int64_t>(slots, 1000));
    const bool dummy = step == 17;
    const int before = serving.total(), records = serving.records;
    rec.end_step(step, dummy);
    const int queued = serving.total() - before;
    CHECK(serving.records == records);
    // Window starts are read at due - window (7, 15, 23): one copy; other steps: nothing.
    CHECK_MESSAGE(queued == (step == 7 || step == 15 || step == 23 ? 1 : 0), "step ", step);
    if (step != due) continue;
    rec.begin_window(step);
    const auto got = flat(rec.finish_window());
    auto want = expected_window(slots, step - window + 1, step);
    const int host_steps = std::min(step, window) - (step - window + 1 <= 17 && 17 <= step ? 1 : 0);
    for (auto& v : want) v += 1000 * host_steps;
    CHECK_MESSAGE(got == want, "window of step ", step);
    due += interval;
    rec.expect_rebalance_at(due, step);
  }
  CHECK_EPLB_ERROR(rec.record_host(1, std::vector<std::int64_t>(slots, 1)), errc::invalid_argument, "layer 1");
  CHECK_EPLB_ERROR(rec.record_host(0, std::vector<std::int64_t>(2, 1)), errc::invalid_argument, "2 counts");
}

namespace {

// One rank on the host device whose load buffer (int32) and maps (int64) are the engine's own.
struct engine_rank {
  std::unique_ptr<device::device> dev = device::make_host_device();
  counting_stream serving{*dev};
  tools::exchange_config shape_cfg{.ranks = 1, .layers = 3, .experts = 8, .redundant = 4, .tensor_bytes = {256, 48}};
  tools::pattern_model model{tools::pattern_shape(shape_cfg),          0,  *dev, serving,
                             tools::round_placement(shape_cfg, 0, {}), 10s};
  std::size_t slots = 12, experts = 8, width = 5, layers = 3;
  device::buffer load = dev->allocate(layers * slots * 4, device::memory_kind::host);
  device::buffer phy2log = dev->allocate(layers * slots * 8, device::memory_kind::host);
  device::buffer log2phy = dev->allocate(layers * experts * width * 8, device::memory_kind::host);
  device::buffer replicas = dev->allocate(layers * experts * 8, device::memory_kind::host);

  state_params params(bool use_async, int window, int interval) {
    state_params p;
    p.cfg = config::from_json(R"({"communicator": "loopback", "num_redundant_experts": 4, "min_improvement": -1})");
    p.cfg.use_async = use_async;
    p.cfg.window_size = window;
    p.cfg.step_interval = interval;
    p.model = {model.shape(), 1, 1};
    p.dev = dev.get();
    p.serving_stream = &serving;
    p.weights = model.weights();
    p.store = comm::make_memory_store();
    p.comm_setup.world = comm::make_loopback_world(1);
    p.log = [](std::string_view) {};
    p.buffers.load = engine_buffer{load.data(), element_type::int32};
    p.buffers.phy2log = engine_buffer{phy2log.data(), element_type::int64};
    p.buffers.log2phy = engine_buffer{log2phy.data(), element_type::int64};
    p.buffers.replica_count = engine_buffer{replicas.data(), element_type::int64};
    return p;
  }

  // The engine's int64 maps against the state's host maps, read once the stream is idle.
  std::string maps_mismatch(const eplb_state& st) {
    serving.synchronize(5s);
    const auto* p2l = reinterpret_cast<const std::int64_t*>(phy2log.data());
    const auto* l2p = reinterpret_cast<const std::int64_t*>(log2phy.data());
    const auto* cnt = reinterpret_cast<const std::int64_t*>(replicas.data());
    const auto& maps = st.maps();
    for (std::size_t l = 0; l < layers; ++l) {
      const auto row = maps.phy2log(static_cast<int>(l));
      for (std::size_t s = 0; s < slots; ++s) {
        if (p2l[l * slots + s] != row[s]) return fmt::format("phy2log layer {} slot {}", l, s);
      }
      for (std::size_t e = 0; e < experts; ++e) {
        const auto where = maps.log2phy(static_cast<int>(l), static_cast<int>(e));
        if (cnt[l * experts + e] != maps.replica_count(static_cast<int>(l), static_cast<int>(e))) {
          return fmt::format("replica_count layer {} expert {}", l, e);
        }
        for (std::size_t k = 0; k < width; ++k) {
          const std::int64_t want = k < where.size() ? where[k] : -1;
          if (l2p[(l * experts + e) * width + k] != want) return fmt::format("log2phy layer {} expert {}", l, e);
        }
      }
    }
    return "";
  }
};

}  // namespace

TEST_CASE("eplb_state with the engine's int32 load and int64 maps: windows, maps, what steps queue") {
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    engine_rank r;
    const std::size_t n = r.layers * r.slots;
    for (std::size_t i = 0; i < n; ++i) reinterpret_cast<std::uint32_t*>(r.load.data())[i] = 0xFFFFFFF0U;  // wraps
    // Async rebalances take more than 10 steps here (commit lag 8): a longer interval keeps them on time.
    const int window = 6, interval = use_async ? 40 : 10, steps = use_async ? 130 : 45;
    eplb_state st(r.params(use_async, window, interval));
    CHECK(st.load_buffer() == nullptr);  // int32: the engine has its own pointer
    CHECK(st.device_phy2log() == nullptr);
    CHECK(st.device_max_replicas() == 5);
    CHECK(r.maps_mismatch(st).empty());  // written at construction
    int trigger = -1, finished = 0, windows_checked = 0, next_due = interval / 4;
    bool deferred = false;
    for (int step = 1; step <= steps; ++step) {
      r.serving.synchronize(5s);
      // The background stages in wall time while these steps take none: a serving loop's steps
      // take milliseconds, which keeps async rebalances (commit lag 8) within the interval.
      if (use_async && st.stats().rebalance_in_flight) std::this_thread::sleep_for(2ms);
      add_step(r.load.data(), element_type::int32, n, step);
      const int before = r.serving.total(), records_before = r.serving.records;
      const auto rep = st.step();
      const int queued = r.serving.total() - before;
      // Due at interval / 4 and every interval after the last start; one still in flight at its due
      // step (async on a slow machine) defers the next start to the step it finishes in.
      if (step == next_due && !rep.rebalance_started) {
        CHECK_MESSAGE(use_async, "step ", step);
        CHECK_MESSAGE(st.stats().rebalance_in_flight, "a due rebalance neither started nor deferred at step ", step);
        deferred = true;
      }
      CHECK_MESSAGE(rep.rebalance_started == (step == next_due || (deferred && rep.rebalance_finished)), "step ", step);
      const bool late = deferred && rep.rebalance_started;
      if (rep.rebalance_started) {
        trigger = late ? -1 : step;  // a late one's window is tested in the recorder's own case
        next_due = step + interval;
        deferred = false;
      }
      // Window starts are read `window` steps before the due step: one copy; other steps: nothing.
      if (!use_async && step != next_due - interval) {
        CHECK_MESSAGE(queued == (step == next_due - window ? 1 : 0), "step ", step);
      }
      // Async commits too: the staging area's release is a mark(), never a host function (issue 17).
      if (use_async || rep.layers_committed == 0) {
        CHECK_MESSAGE(r.serving.records == records_before, "step ", step);
      }
      // Sync plans in the trigger step, async load_readback_lag_steps later, from the same window.
      if (trigger > 0 && step == trigger + (use_async ? load_readback_lag_steps : 0)) {
        CHECK_MESSAGE(flat(st.window_load()) == expected_window(n, trigger - window + 1, trigger), "step ", step);
        ++windows_checked;
      }
      if (rep.rebalance_finished) {
        ++finished;
        const auto bad = r.maps_mismatch(st);
        CHECK_MESSAGE(bad.empty(), bad);
        for (int l = 0; l < 3; ++l) CHECK(r.model.mismatch(l, st.maps().phy2log(l), 0).empty());
      }
    }
    CHECK(windows_checked >= 3);
    CHECK(finished >= 3);
    st.stop();
  }
}

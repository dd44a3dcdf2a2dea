// The expert load of one rank: the counter buffer the engine's router adds to (eplb's own or the
// engine's, int32 or int64), never cleared, and readings of it taken only on the steps a window
// needs. The window of a rebalance at step T is reading(T) - reading(T - window): the first is
// taken at step T - window (one stream-ordered copy into pinned memory, no event), the second at
// step T (a copy and a pooled event) and read on the host once that copy is done, so a quiet step
// queues nothing on the serving stream and no step waits for the GPU unless told to. Rebalances
// are due every step_interval steps; with a window longer than the interval, a reading is kept for
// each due rebalance whose window has begun (at most window / interval + 1 of them). Counts given
// from the host (record_load) keep their own running total, read at the same steps. Serving thread
// only.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "eplb/core/matrix.hpp"
#include "eplb/device/device.hpp"
#include "eplb/state.hpp"

namespace eplb::state_detail {

struct load_shape {
  int layers = 0;
  int num_physical = 0;
  int window_size = 1;
  int step_interval = 1;
  std::int64_t first_step = 0;  // the step it starts at (a state rebuilt by rescale() goes on counting)
};

class load_recorder {
 public:
  /// `engine`: the engine's load buffer, or empty for eplb's own (int64, zeroed here). Takes the
  /// reading of step 0, which windows reaching back before the first step start from.
  load_recorder(device::device& dev, device::stream& serving, const load_shape& shape,
                const std::optional<engine_buffer>& engine, std::chrono::milliseconds timeout);

  /// eplb's own buffer or the engine's int64 one; nullptr for the engine's int32 one.
  [[nodiscard]] std::int64_t* buffer() const noexcept;
  /// Adds host-side counts (one per physical slot) to the current step of `layer`.
  void record_host(int layer, std::span<const std::int64_t> counts);

  /// Ends step `step` (1, 2, ...): the step's host counts join their total unless it is a dummy
  /// step, and the reading that a window starting here needs is taken. O(1) on other steps.
  void end_step(std::int64_t step, bool dummy);
  /// Said at step `now` (0 before the first): the next rebalance is due at step `due` and every
  /// step_interval steps after it; the readings their windows start from are taken at those steps
  /// minus window_size (those already passed start from the latest reading before them).
  void expect_rebalance_at(std::int64_t due, std::int64_t now);

  /// The window of a rebalance triggered at step `step`: the reading of this step is queued (a copy
  /// and a pooled event); its start is the latest reading taken at or before step - window_size.
  void begin_window(std::int64_t step);
  [[nodiscard]] bool window_pending() const noexcept { return pending_; }
  /// Whether begin_window()'s copy is done (never waits).
  [[nodiscard]] bool window_ready() const;
  /// Waits for begin_window()'s copy (error(errc::timeout) after the timeout) and returns the
  /// window's load per slot (layers x slots).
  const matrix<std::int64_t>& finish_window();
  /// The latest finished window (zeros before the first).
  [[nodiscard]] const matrix<std::int64_t>& last_window() const noexcept { return window_; }

  /// A reading for the balancedness log at step `step`; false (nothing queued) while the previous
  /// one is not done yet.
  bool begin_log_reading(std::int64_t step);
  /// Once the log reading is done: the load since the log reading before it, and its step.
  [[nodiscard]] std::optional<std::pair<std::int64_t, matrix<std::int64_t>>> take_log();

 private:
  // A reading of the counters: its pinned copy of the buffer and the host total at that step.
  struct reading {
    std::int64_t step = -1;  // -1: free
    std::byte* copy = nullptr;
    std::vector<std::int64_t> host;
  };
  void take(reading& r, std::int64_t step);
  [[nodiscard]] reading& free_snapshot();
  void add_difference(matrix<std::int64_t>& out, const reading& later, const reading& earlier) const;

  std::size_t count_;
  std::size_t bytes_;  // of the buffer and of each reading's copy
  load_shape shape_;
  element_type type_;
  std::chrono::milliseconds timeout_;
  device::stream& serving_;
  // stream_buffers: after a timed-out wait the serving stream may still touch them, so they are
  // freed only once it has passed what was queued.
  device::stream_buffer own_;      // eplb's counters, unless the engine gave its own
  std::byte* counters_ = nullptr;  // own_ or the engine's
  device::stream_buffer pinned_;   // every reading's copy, one area each
  std::vector<reading> snapshots_;
  reading now_;
  std::array<reading, 2> log_;  // the previous log reading and the one in flight
  std::int64_t next_snapshot_ = -1;
  std::size_t start_ = 0;  // the snapshot the pending window starts from
  bool pending_ = false;
  device::event now_done_;
  int log_next_ = 1;
  bool log_pending_ = false;
  device::event log_done_;
  bool host_used_ = false;  // record_host() was called: host totals are kept and read
  bool host_dirty_ = false;
  std::vector<std::int64_t> host_step_, host_total_;
  matrix<std::int64_t> window_;
};

}  // namespace eplb::state_detail

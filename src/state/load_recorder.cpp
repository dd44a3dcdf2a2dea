#include "state/load_recorder.hpp"

#include <algorithm>

#include "state/engine_buffers.hpp"
#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {
// Readings kept for window starts: one per due rebalance whose window has begun (window / interval
// + 1), the one a pending window uses, and a free one for the next.
std::size_t snapshot_count(const load_shape& s) {
  return static_cast<std::size_t>(s.window_size / s.step_interval) + 3;
}
}  // namespace

load_recorder::load_recorder(device::device& dev, device::stream& serving, const load_shape& shape,
                             const std::optional<engine_buffer>& engine, std::chrono::milliseconds timeout)
    : count_(static_cast<std::size_t>(shape.layers) * static_cast<std::size_t>(shape.num_physical)),
      shape_(shape),
      type_(engine ? engine->type : element_type::int64),
      timeout_(timeout),
      serving_(serving),
      window_(static_cast<std::size_t>(shape.layers), static_cast<std::size_t>(shape.num_physical), 0) {
  bytes_ = count_ * element_size(type_);
  if (engine) {
    counters_ = static_cast<std::byte*>(engine->data);
  } else {
    const auto mem = dev.kind() == device::backend_kind::cuda ? device::memory_kind::device : device::memory_kind::host;
    own_ = device::stream_buffer(dev, serving, bytes_, mem);
    counters_ = own_.data();
    serving.fill(counters_, std::byte{0}, bytes_);
  }
  snapshots_.resize(snapshot_count(shape));
  const std::size_t areas = snapshots_.size() + 1 + log_.size();
  pinned_ = device::stream_buffer(dev, serving, areas * bytes_, device::memory_kind::pinned);
  std::byte* area = pinned_.data();
  for (auto* r : {&now_, &log_[0], &log_[1]}) {
    r->copy = area;
    area += bytes_;
  }
  for (auto& r : snapshots_) {
    r.copy = area;
    area += bytes_;
  }
  host_step_.assign(count_, 0);
  host_total_.assign(count_, 0);
  take(snapshots_[0], shape.first_step);  // windows that reach back before the first step start here
  take(log_[0], 0);
}

std::int64_t* load_recorder::buffer() const noexcept {
  return type_ == element_type::int64 ? reinterpret_cast<std::int64_t*>(counters_) : nullptr;
}

void load_recorder::record_host(int layer, std::span<const std::int64_t> counts) {
  if (layer < 0 || layer >= shape_.layers) fail(errc::invalid_argument, "record_load: layer {} out of range", layer);
  if (counts.size() != static_cast<std::size_t>(shape_.num_physical)) {
    fail(errc::invalid_argument, "record_load: {} counts for layer {}, expected one per physical slot ({})",
         counts.size(), layer, shape_.num_physical);
  }
  auto* row = host_step_.data() + static_cast<std::size_t>(layer) * static_cast<std::size_t>(shape_.num_physical);
  for (std::size_t i = 0; i < counts.size(); ++i) row[i] += counts[i];
  host_used_ = true;
  host_dirty_ = true;
}

// One stream-ordered copy of the counters into the reading's pinned area (no event: whoever reads
// it waits for a later event on the same stream), and the host total as of this step.
void load_recorder::take(reading& r, std::int64_t step) {
  r.step = step;
  serving_.copy(r.copy, counters_, bytes_);
  if (host_used_) {
    r.host = host_total_;
  } else {
    r.host.clear();  // no host counts so far: a total of zeros
  }
}

void load_recorder::end_step(std::int64_t step, bool dummy) {
  if (host_dirty_) {
    // A dummy step's host counts are dropped, as vLLM drops a dummy step's load.
    if (!dummy) {
      for (std::size_t i = 0; i < count_; ++i) host_total_[i] += host_step_[i];
    }
    std::fill(host_step_.begin(), host_step_.end(), 0);
    host_dirty_ = false;
  }
  if (step != next_snapshot_) return;
  take(free_snapshot(), step);
  next_snapshot_ += shape_.step_interval;
}

void load_recorder::expect_rebalance_at(std::int64_t due, std::int64_t now) {
  // The window starts of rebalances due at due + k * interval, k >= 0: the first one still ahead.
  std::int64_t first = due - shape_.window_size;
  if (first <= now) {
    const std::int64_t k = (now - first) / shape_.step_interval + 1;
    first += k * shape_.step_interval;
  }
  next_snapshot_ = first;
}

// A snapshot area that no window needs: a free one, else the oldest that the pending window does
// not start from (only when a rebalance is very late and readings for its later windows piled up).
load_recorder::reading& load_recorder::free_snapshot() {
  reading* oldest = nullptr;
  for (std::size_t i = 0; i < snapshots_.size(); ++i) {
    auto& r = snapshots_[i];
    if (r.step < 0) return r;
    if (pending_ && i == start_) continue;
    if (oldest == nullptr || r.step < oldest->step) oldest = &r;
  }
  return *oldest;  // snapshot_count() >= 3 leaves one besides the pending window's start
}

void load_recorder::begin_window(std::int64_t step) {
  const std::int64_t from = step - shape_.window_size;
  std::optional<std::size_t> best, oldest;
  for (std::size_t i = 0; i < snapshots_.size(); ++i) {
    const auto s = snapshots_[i].step;
    if (s < 0) continue;
    if (s <= from && (!best || s > snapshots_[*best].step)) best = i;
    if (!oldest || s < snapshots_[*oldest].step) oldest = i;
  }
  start_ = best ? *best : *oldest;  // the step-0 reading is kept until a later one replaces it
  take(now_, step);
  now_done_ = serving_.mark();
  pending_ = true;
}

bool load_recorder::window_ready() const {
  return pending_ && now_done_.query();
}

const matrix<std::int64_t>& load_recorder::finish_window() {
  if (!pending_) fail(errc::internal, "load_recorder: no window was begun");
  pending_ = false;  // also when the wait fails: that rebalance is given up
  now_done_.wait(timeout_);
  std::fill(window_.flat().begin(), window_.flat().end(), 0);
  const auto& start = snapshots_[start_];
  add_difference(window_, now_, start);
  // Later windows start after this one's start: older readings are done with.
  for (auto& r : snapshots_) {
    if (r.step >= 0 && r.step < start.step) r.step = -1;
  }
  return window_;
}

void load_recorder::add_difference(matrix<std::int64_t>& out, const reading& later, const reading& earlier) const {
  add_increase(out.flat(), later.copy, earlier.copy, type_);
  if (later.host.empty()) return;
  auto flat = out.flat();
  for (std::size_t i = 0; i < count_; ++i) flat[i] += later.host[i] - (earlier.host.empty() ? 0 : earlier.host[i]);
}

bool load_recorder::begin_log_reading(std::int64_t step) {
  if (log_pending_) return false;
  take(log_[static_cast<std::size_t>(log_next_)], step);
  log_done_ = serving_.mark();
  log_pending_ = true;
  return true;
}

std::optional<std::pair<std::int64_t, matrix<std::int64_t>>> load_recorder::take_log() {
  if (!log_pending_ || !log_done_.query()) return std::nullopt;
  log_pending_ = false;
  const auto& now = log_[static_cast<std::size_t>(log_next_)];
  const auto& before = log_[static_cast<std::size_t>(1 - log_next_)];
  matrix<std::int64_t> since(window_.rows(), window_.cols(), 0);
  add_difference(since, now, before);
  log_next_ = 1 - log_next_;
  return std::make_pair(now.step, std::move(since));
}

}  // namespace eplb::state_detail

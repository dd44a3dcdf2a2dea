#include "state/load_recorder.hpp"

#include <algorithm>

#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {
// Four copies in flight are enough for the serving loop never to wait on one (a copy takes
// microseconds, a step milliseconds).
constexpr int ring_slots = 4;
}  // namespace

load_recorder::load_recorder(device::device& dev, device::stream& serving, int layers, int num_physical,
                             int window_size, std::chrono::milliseconds timeout)
    : num_physical_(num_physical),
      count_(static_cast<std::size_t>(layers) * static_cast<std::size_t>(num_physical)),
      timeout_(timeout),
      serving_(serving),
      window_(window_size, layers, num_physical) {
  const auto mem = dev.kind() == device::backend_kind::cuda ? device::memory_kind::device : device::memory_kind::host;
  load_ = device::stream_buffer(dev, serving, count_ * sizeof(std::int64_t), mem);
  serving.fill(load_.data(), std::byte{0}, load_.size());
  for (int i = 0; i < ring_slots; ++i) {
    ring_.emplace_back(dev, serving, load_.size(), device::memory_kind::pinned);
  }
  host_extra_.assign(count_, 0);
}

std::int64_t* load_recorder::buffer() const noexcept {
  return reinterpret_cast<std::int64_t*>(load_.data());
}

void load_recorder::record_host(int layer, std::span<const std::int64_t> counts) {
  const int layers = static_cast<int>(count_ / static_cast<std::size_t>(num_physical_));
  if (layer < 0 || layer >= layers) fail(errc::invalid_argument, "record_load: layer {} out of range", layer);
  if (counts.size() != static_cast<std::size_t>(num_physical_)) {
    fail(errc::invalid_argument, "record_load: {} counts for layer {}, expected one per physical slot ({})",
         counts.size(), layer, num_physical_);
  }
  auto* row = host_extra_.data() + static_cast<std::size_t>(layer) * static_cast<std::size_t>(num_physical_);
  for (std::size_t i = 0; i < counts.size(); ++i) row[i] += counts[i];
}

void load_recorder::drain(bool dummy) {
  // Keep the ring bounded: wait for the oldest copy only when every slot is in use.
  if (pending_.size() == ring_.size()) fold_one(true);
  const int slot = next_slot_;
  next_slot_ = (next_slot_ + 1) % static_cast<int>(ring_.size());
  if (!dummy) serving_.copy(ring_[static_cast<std::size_t>(slot)].data(), load_.data(), load_.size());
  serving_.fill(load_.data(), std::byte{0}, load_.size());
  pending_.push_back({slot, dummy, serving_.record()});
  while (!pending_.empty() && pending_.front().copied.query()) fold_one(false);
}

void load_recorder::fold_one(bool wait) {
  auto p = pending_.front();
  if (wait) p.copied.wait(timeout_);
  pending_.pop_front();
  if (p.dummy) return;  // dummy steps count as steps but record no load
  const auto* counts = reinterpret_cast<const std::int64_t*>(ring_[static_cast<std::size_t>(p.slot)].data());
  folded_.assign(counts, counts + count_);
  for (std::size_t i = 0; i < count_; ++i) folded_[i] += std::exchange(host_extra_[i], 0);
  window_.record(folded_);
}

void load_recorder::flush() {
  while (!pending_.empty()) fold_one(true);
  if (std::any_of(host_extra_.begin(), host_extra_.end(), [](std::int64_t v) { return v != 0; })) {
    window_.record(host_extra_);
    std::fill(host_extra_.begin(), host_extra_.end(), 0);
  }
}

}  // namespace eplb::state_detail

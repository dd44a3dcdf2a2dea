#include "tools/simulate_trace.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "util/fail.hpp"
#include "util/json_text.hpp"

namespace eplb::tools {

jsonl_sink::jsonl_sink(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(errc::invalid_argument, "--jsonl {}: cannot open for writing ({})", excerpt(path), errno);
}

jsonl_sink::~jsonl_sink() {
  if (fd_ >= 0) ::close(fd_);
}

void jsonl_sink::write(const nlohmann::json& record) {
  const auto line = record.dump() + '\n';
  const auto n = ::write(fd_, line.data(), line.size());
  if (n != static_cast<ssize_t>(line.size())) {
    fail(errc::internal, "--jsonl {}: write failed (errno {}); records lost", excerpt(path_), errno);
  }
}

load_sampler::load_sampler(int layers, int ranks, int slots_per_rank, int sample_every)
    : layers_(layers),
      ranks_(ranks),
      slots_per_rank_(slots_per_rank),
      every_(std::max(1, sample_every)),
      current_(static_cast<std::size_t>(layers) * static_cast<std::size_t>(ranks), 0) {}

void load_sampler::add(int layer, std::span<const std::int64_t> slot_counts) {
  auto* row = current_.data() + static_cast<std::size_t>(layer) * static_cast<std::size_t>(ranks_);
  for (std::size_t s = 0; s < slot_counts.size(); ++s)
    row[s / static_cast<std::size_t>(slots_per_rank_)] += slot_counts[s];
}

void load_sampler::end_step(int step) {
  if (step % every_ != 0) return;
  steps_.push_back(step);
  samples_.push_back(current_);
  std::fill(current_.begin(), current_.end(), 0);
}

nlohmann::json load_sampler::to_json() const {
  return {{"every", every_}, {"layers", layers_}, {"ranks", ranks_}, {"steps", steps_}, {"loads", samples_}};
}

int sample_every(int steps, int layers, int ranks) {
  const std::int64_t per_sample = static_cast<std::int64_t>(layers) * ranks * ranks;  // over every rank's report
  const std::int64_t budget = std::int64_t{1} << 22;
  const std::int64_t samples = std::clamp<std::int64_t>(budget / std::max<std::int64_t>(1, per_sample), 10, 200);
  return static_cast<int>(std::max<std::int64_t>(1, (steps + samples - 1) / samples));
}

}  // namespace eplb::tools

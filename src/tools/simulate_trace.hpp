// What `eplb simulate --report/--jsonl` records on each rank while it serves: the load it routed to
// every rank per layer, summed over sample intervals (the merged report turns them into global
// and per-rank balancedness over the steps), and, with --jsonl, one JSON line per step and per
// rebalance appended to a file that every rank (thread or process) shares.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

namespace eplb::tools {

/// Appends whole lines to a file shared by threads and processes: each line is one write() on a
/// descriptor opened with O_APPEND, so lines of different ranks never interleave.
class jsonl_sink {
 public:
  /// error(errc::invalid_argument) naming --jsonl when the file cannot be opened.
  explicit jsonl_sink(const std::string& path);
  ~jsonl_sink();
  jsonl_sink(const jsonl_sink&) = delete;
  jsonl_sink& operator=(const jsonl_sink&) = delete;
  /// error(errc::internal) when the line could not be written whole (a full disk).
  void write(const nlohmann::json& record);

 private:
  int fd_ = -1;
  std::string path_;
};

/// Load samples of one rank. Rows are steps / sample_every samples; each holds layers x ranks
/// token counts: this rank's tokens routed to each rank's slots in that layer.
class load_sampler {
 public:
  /// `slot_rank[s]`: the rank holding physical slot s (slots are contiguous per rank).
  load_sampler(int layers, int ranks, int slots_per_rank, int sample_every);
  void add(int layer, std::span<const std::int64_t> slot_counts);
  /// Ends `step`; every sample_every steps the sums so far become a sample.
  void end_step(int step);
  /// {"every": n, "steps": [...], "loads": [[layer-major counts], ...]}
  [[nodiscard]] nlohmann::json to_json() const;

 private:
  int layers_, ranks_, slots_per_rank_, every_;
  std::vector<std::int64_t> current_;
  std::vector<int> steps_;
  std::vector<std::vector<std::int64_t>> samples_;
};

/// Samples per run: at most 200, and fewer for big shapes so that every rank's samples stay under
/// about 2^22 numbers in the merged report.
[[nodiscard]] int sample_every(int steps, int layers, int ranks);

}  // namespace eplb::tools

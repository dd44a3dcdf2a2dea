// Small collectives over the rendezvous store, on the CPU only (never NCCL): the load all-reduce
// of a rebalance and the per-step commit agreement. Every rank must call the same operations in
// the same order; every wait has the group's timeout and names a silent rank.
#pragma once

#include <map>
#include <mutex>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "eplb/comm/store.hpp"

namespace eplb::runtime {

class cpu_group {
 public:
  cpu_group(std::shared_ptr<comm::store> store, int rank, int size, std::chrono::milliseconds timeout);

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  /// Element-wise sum over ranks; every rank passes the same length. `timeout` (default: the
  /// group's) bounds the wait for the other ranks.
  [[nodiscard]] std::vector<double> allreduce_sum(std::span<const double> values,
                                                  std::optional<std::chrono::milliseconds> timeout = {});
  /// Minimum over ranks of round `round` of rebalance `rebalance` (numbers every rank derives
  /// alike: rounds are independent, so one abandoned by a failure cannot shift the next).
  [[nodiscard]] std::int64_t allreduce_min(std::int64_t value, std::int64_t rebalance, std::int64_t round);

 private:
  // Posts this rank's value of `round` and reads every rank's; `family` names the sequence of
  // rounds whose keys are cleaned up together (see posted()).
  // `order`: within a namespace, rounds of a family with a smaller order are older (rebalance ids).
  std::vector<std::string> exchange(const std::string& family, std::uint64_t order, const std::string& round,
                                    std::string mine, std::chrono::milliseconds timeout);
  [[nodiscard]] std::string read(const std::string& key, int from, const std::string& round,
                                 std::chrono::steady_clock::time_point deadline, std::chrono::milliseconds timeout);
  void posted(const std::string& family, std::uint64_t order, std::string key);
  void completed(const std::string& family);

  std::shared_ptr<comm::store> store_;
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  std::uint64_t sum_generation_ = 0;  // one load sum at a time: the serving thread's, or the rebalance's pool job
  // This rank's keys per family: those of the round in progress, and older ones to delete once a
  // later round completes. Sums and agreement rounds run on different threads.
  struct own_keys {
    std::vector<std::string> current;
    std::vector<std::string> stale;
    std::uint64_t order = 0;  // within a namespace, older families have smaller orders
  };
  std::mutex mutex_;
  std::map<std::string, own_keys> families_;
};

}  // namespace eplb::runtime

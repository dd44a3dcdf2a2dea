// Small collectives over the rendezvous store, on the CPU only (never NCCL): the load all-reduce
// of a rebalance and the per-step commit agreement. Every rank must call the same operations in
// the same order; every wait has the group's timeout and names a silent rank.
//
// Stopping (issue 17): a wait observes the group's stop token (it waits in slices of wait_slice
// and ends with errc::cancelled once a stop is requested), and a rank that stops says so with a
// "stopping/RANK" key set to "1" (announce_stop()); a peer waiting for its keys then fails with
// errc::peer_failure naming it. After the announcement the rank writes no key of a round any more,
// so a key is either there before it or never: every peer decides the same.
#pragma once

#include <map>
#include <mutex>
#include <shared_mutex>
#include <stop_token>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "eplb/comm/store.hpp"

namespace eplb::runtime {

/// How long a store wait runs before it looks at the stop token and the peer's announcement again:
/// the bound on how late a stop or a stopped peer is noticed.
inline constexpr std::chrono::milliseconds wait_slice{40};

/// The key a stopping rank sets to "1" (cpu_group::announce_stop) in the group's store.
[[nodiscard]] std::string stopping_key(int rank);
/// Whether `rank` announced its stop in `s`. Never waits.
[[nodiscard]] bool announced_stop(comm::store& s, int rank);

class cpu_group {
 public:
  cpu_group(std::shared_ptr<comm::store> store, int rank, int size, std::chrono::milliseconds timeout,
            std::stop_token stop = {});

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] int size() const noexcept { return size_; }
  /// Element-wise sum over ranks; every rank passes the same length. `timeout` (default: the
  /// group's) bounds the wait for the other ranks.
  [[nodiscard]] std::vector<double> allreduce_sum(std::span<const double> values,
                                                  std::optional<std::chrono::milliseconds> timeout = {});
  /// Minimum over ranks of round `round` of rebalance `rebalance` (numbers every rank derives
  /// alike: rounds are independent, so one abandoned by a failure cannot shift the next).
  [[nodiscard]] std::int64_t allreduce_min(std::int64_t value, std::int64_t rebalance, std::int64_t round);
  /// Posts this rank's value of that round without waiting for the others' (a rank that stops
  /// fills the rounds its peers still wait for). errc::cancelled after announce_stop().
  void post_min(std::int64_t value, std::int64_t rebalance, std::int64_t round);
  /// This rank is stopping: from now on it writes no round key (a post in progress ends first),
  /// then it sets its stopping key, so that peers waiting for it fail at once. Idempotent,
  /// never throws; blocks only as long as one store write.
  void announce_stop() noexcept;

 private:
  // Writes a key of this rank unless it announced its stop (then errc::cancelled).
  void set_own(const std::string& key, const std::string& value);
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
  std::stop_token stop_;
  std::shared_mutex post_mutex_;      // shared by writers of round keys, exclusive for announce_stop()
  bool stopped_ = false;              // under post_mutex_
  std::uint64_t sum_generation_ = 0;  // one load sum at a time: the serving thread's, or the rebalance's pool job
  // This rank's keys per family: those of the round in progress, and older ones to delete once a
  // later round completes. Sums and agreement rounds run on different threads.
  struct own_keys {
    std::vector<std::string> current;
    std::vector<std::string> stale;
    // post_min()'s keys: posted ahead of the rounds still queued on this rank, so a round of the
    // same family that completes later proves nothing about who read them. Deleted only with the
    // whole family, once a later rebalance's round completes (every rank has moved on).
    std::vector<std::string> ahead;
    std::uint64_t order = 0;  // within a namespace, older families have smaller orders
  };
  std::mutex mutex_;
  std::map<std::string, own_keys> families_;
};

}  // namespace eplb::runtime

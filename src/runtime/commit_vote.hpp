// The write decision of a synchronous rebalance: before any rank writes a batch of a layer into
// live slots, every rank says whether its own transfers of that batch succeeded, and one decision,
// written once in the store (the first writer wins), tells every rank the same thing. So all ranks
// stop at the same batch and end with identical maps, whatever failed where.
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "eplb/comm/store.hpp"

namespace eplb::runtime {

class commit_vote {
 public:
  commit_vote(std::shared_ptr<comm::store> store, int rank, int size, std::chrono::milliseconds timeout);

  /// Starts rebalance `id`: its batches are numbered from 0 in the order every rank decides them.
  void begin(std::int64_t id);
  /// This rank's verdict on the next batch (`layer`, `chunk` name it in messages; `failure` is this
  /// rank's error, if any) and the group's decision: "" = every rank writes it, else why not. Blocks
  /// the calling thread at most twice the timeout (a peer's transfers of the batch have the timeout
  /// too); a decision that has not come by then is made "not written", naming how many ranks voted.
  [[nodiscard]] std::string decide(int layer, int chunk, const std::exception_ptr& failure);
  /// This rank stopped outside a batch (the load sum, the policy, a posting error): its next batch
  /// is decided "not written" at once, so its peers do not wait for a vote that never comes.
  void abort(const std::string& why) noexcept;
  /// After a failed rebalance: waits until every rank has ended it too (at most three timeouts:
  /// a peer may still wait out a transfer and its in-flight batches), so that a rank that failed
  /// fast does not run ahead into the next collective alone and time out there. A dead peer
  /// costs the wait once; nothing is thrown.
  void settle(std::int64_t id) noexcept;
  /// Deletes the keys of every earlier rebalance not deleted yet (rank 0 does it for all): also
  /// those whose own load sum failed, so that no rebalance's keys stay behind. Call once every rank
  /// is known to have ended them: after the current one's load sum, which every rank joins only
  /// once it has.
  void forget_previous() noexcept;

 private:
  [[nodiscard]] std::string key(const char* what) const;

  std::shared_ptr<comm::store> store_;
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  std::int64_t id_ = -1;
  std::int64_t batch_ = 0;
  bool aborted_ = false;
  // Earlier rebalances whose keys are still in the store: id and how many batches each keyed.
  // One entry per rebalance since the last successful load sum.
  std::vector<std::pair<std::int64_t, std::int64_t>> unforgotten_;
};

}  // namespace eplb::runtime

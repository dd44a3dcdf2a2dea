// Running one process per rank of this same program (gloo and NCCL ranks meet through a file store
// in a fresh directory); each child writes its result into a file the parent reads back.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "eplb/comm/store.hpp"

namespace eplb::tools {

struct rank_process {
  int exit_status = -1;
  bool killed = false;  ///< still running at the deadline
  std::string result;   ///< what the child wrote into its result file (empty if nothing)
};

/// Starts `ranks` copies of `self_exe` with `child_args` plus `--rank R --store DIR --result FILE`,
/// waits for all and returns what each reported. Children still running at `deadline`, or `grace`
/// after the first child failed (a stopped or wedged rank), are killed; `expected_death`'s failure
/// is part of the run (its peers serve on without it) and starts no grace period.
[[nodiscard]] std::vector<rank_process> run_rank_processes(const std::string& self_exe,
                                                           const std::vector<std::string>& child_args, int ranks,
                                                           std::chrono::steady_clock::time_point deadline,
                                                           std::chrono::milliseconds grace = std::chrono::hours(1),
                                                           int expected_death = -1);

/// The rendezvous of one rank started on its own (`--rank R --store SPEC`, e.g. one per host).
/// SPEC: DIR or file:DIR (a file store the ranks share), tcp:HOST:PORT (connect to a TCP store),
/// tcp-serve:HOST:PORT (serve the TCP store on HOST:PORT, then connect to it: one rank does this).
/// error(errc::invalid_argument) naming --store for anything else.
///
/// A store may outlive a run (a directory used again, a tcp-serve still up), so every run works
/// under its own prefix, run-K, K being how often rank `rank` joined this store before; ranks of one
/// run meet there before anything else. Ranks that disagree on K (an earlier run on this store did
/// not start every rank) time out at that meeting with error(errc::timeout) naming each rank's joins
/// and the stale store, instead of reading an older run's keys.
class rank_store {
 public:
  rank_store(const std::string& spec, int ranks, int rank, std::chrono::milliseconds timeout);
  [[nodiscard]] const std::shared_ptr<comm::store>& get() const noexcept { return store_; }
  /// After a successful run: every rank says it is done with the store, and the rank serving it
  /// waits (up to the timeout) until all others are, so no rank loses the server mid-request.
  void finish();

 private:
  void join_run(const std::string& spec, int rank);

  std::unique_ptr<comm::tcp_store_server> server_;
  std::shared_ptr<comm::store> store_;
  int ranks_;
  std::chrono::milliseconds timeout_;
};

}  // namespace eplb::tools

// Running one process per rank of this same program (gloo and NCCL ranks meet through a file store
// in a fresh directory); each child writes its result into a file the parent reads back.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace eplb::tools {

struct rank_process {
  int exit_status = -1;
  bool killed = false;  ///< still running at the deadline
  std::string result;   ///< what the child wrote into its result file (empty if nothing)
};

/// Starts `ranks` copies of `self_exe` with `child_args` plus `--rank R --store DIR --result FILE`,
/// waits for all and returns what each reported. Children still running at `deadline`, or `grace`
/// after the first child failed (a stopped or wedged rank), are killed.
[[nodiscard]] std::vector<rank_process> run_rank_processes(const std::string& self_exe,
                                                           const std::vector<std::string>& child_args, int ranks,
                                                           std::chrono::steady_clock::time_point deadline,
                                                           std::chrono::milliseconds grace = std::chrono::hours(1));

}  // namespace eplb::tools

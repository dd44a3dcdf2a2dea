// Where this process runs, as peers compare it: the host's boot id (equal for processes of one
// host, whatever their network names), the PID namespace and the pid (equal for threads of one
// process). Used to decide whether ranks can share memory.
#pragma once

#include <string>

namespace eplb::comm {

struct host_identity {
  std::string host;     ///< hostname, for messages
  std::string boot_id;  ///< /proc/sys/kernel/random/boot_id
  std::string pid_ns;   ///< the /proc/self/ns/pid link
  long pid = 0;
};

[[nodiscard]] host_identity this_process();

/// Processes of one host (one boot), whatever their network names: they can share memory.
[[nodiscard]] inline bool same_host(const host_identity& a, const host_identity& b) {
  return a.boot_id == b.boot_id;
}
/// Threads of one process: the same pid in the same PID namespace. Shared-memory transports need
/// one process per rank.
[[nodiscard]] inline bool same_process(const host_identity& a, const host_identity& b) {
  return a.pid == b.pid && a.pid_ns == b.pid_ns;
}

/// False once process `pid` (of this PID namespace) has exited, including a zombie its parent has
/// not reaped yet; true when that cannot be told.
[[nodiscard]] bool process_alive(long pid);

/// The first line of a text file, empty when it cannot be read.
[[nodiscard]] std::string read_first_line(const char* path);

}  // namespace eplb::comm

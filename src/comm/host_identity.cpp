#include "comm/host_identity.hpp"

#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>

#include <array>
#include <cerrno>
#include <fstream>

namespace eplb::comm {

std::string read_first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

host_identity this_process() {
  host_identity me;
  std::array<char, 256> name{};
  (void)::gethostname(name.data(), name.size() - 1);
  me.host = name.data();
  me.boot_id = read_first_line("/proc/sys/kernel/random/boot_id");
  std::array<char, 128> link{};
  const auto n = ::readlink("/proc/self/ns/pid", link.data(), link.size() - 1);
  me.pid_ns = n > 0 ? std::string(link.data(), static_cast<std::size_t>(n)) : std::string("unknown");
  me.pid = static_cast<long>(::getpid());
  return me;
}

bool process_alive(long pid) {
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  const std::string stat = read_first_line(fmt::format("/proc/{}/stat", pid).c_str());
  const auto close = stat.rfind(')');
  if (close == std::string::npos || close + 2 >= stat.size()) return true;  // cannot tell: alive
  const char state = stat[close + 2];
  return state != 'Z' && state != 'X';
}

}  // namespace eplb::comm

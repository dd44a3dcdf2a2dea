#include "comm/host_identity.hpp"

#include <unistd.h>

#include <array>
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

}  // namespace eplb::comm

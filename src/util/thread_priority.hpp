// Lowers the calling thread's CPU priority (Linux nice value; threads it creates inherit it), so
// that background transfer threads yield the CPU to the serving loop. Best effort: a failure only
// leaves the priority as it was.
#pragma once

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace eplb {

inline void lower_thread_priority(int nice) noexcept {
  if (nice <= 0) return;
  const auto tid = static_cast<id_t>(::syscall(SYS_gettid));
  const int now = ::getpriority(PRIO_PROCESS, tid);
  if (now < nice) (void)::setpriority(PRIO_PROCESS, tid, nice);
}

}  // namespace eplb

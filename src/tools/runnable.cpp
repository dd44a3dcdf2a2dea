#include "tools/runnable.hpp"

#include "util/fail.hpp"

namespace eplb::tools {

void check_runnable(comm::backend backend, device::backend_kind device) {
  if (device == device::backend_kind::cuda && device::cuda_device_count() == 0) {
    fail(errc::invalid_argument, "--device cuda: no usable GPU here (eplb info lists what can run)");
  }
  for (const auto& b : comm::backend_report()) {
    if (b.kind == backend && !b.runnable) {
      fail(errc::invalid_argument, "--backend {}: cannot run here: {}", comm::to_string(backend), b.reason);
    }
  }
}

}  // namespace eplb::tools

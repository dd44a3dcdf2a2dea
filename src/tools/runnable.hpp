// What the `eplb` tools check before any rank starts: a run that cannot work here (no GPU for
// --device cuda, a communicator not built or without its hardware) is bad input, exit 2, named by
// its flag, instead of ranks that start and each fail.
#pragma once

#include "eplb/comm/communicator.hpp"
#include "eplb/device/device.hpp"

namespace eplb::tools {

/// error(errc::invalid_argument) naming --device or --backend and why it cannot run here.
void check_runnable(comm::backend backend, device::backend_kind device);

}  // namespace eplb::tools

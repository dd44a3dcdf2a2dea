// Devices and options shared by the Communicator and State bindings.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "arrays.hpp"
#include "eplb/comm/communicator.hpp"
#include "eplb/device/device.hpp"

namespace eplb::python {

/// A host device ("cpu") or the CUDA device `ordinal` ("cuda").
[[nodiscard]] std::unique_ptr<device::device> open_device(const std::string& kind, int ordinal);

/// Communicator options from keyword arguments (timeout in seconds, chunk_bytes, lanes, staging_bytes,
/// hostname, nice, gloo_transport, cuda_ipc_pull, max_gbps); an unknown key or a wrong type is
/// error(errc::invalid_argument) naming it.
[[nodiscard]] comm::options parse_options(const py::dict& kwargs);

/// error(errc::invalid_argument) naming `arg` when `t` cannot be used with a communicator on `dev`.
void check_placement(const tensor_view& t, std::string_view arg, const device::device& dev, comm::capabilities caps);

/// A LoopbackWorld Python object: the group of threads a loopback communicator belongs to.
struct world_handle {
  std::shared_ptr<comm::loopback_world> world;
  int size = 0;
};

}  // namespace eplb::python

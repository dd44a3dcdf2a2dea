// The parts of the _eplb extension module; each binds one area of the public API.
#pragma once

#include <pybind11/pybind11.h>

namespace eplb::python {

namespace py = pybind11;

void bind_policy(py::module_& m);
void bind_stores(py::module_& m);
void bind_communicator(py::module_& m);
void bind_state(py::module_& m);

}  // namespace eplb::python

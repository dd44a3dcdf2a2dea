// The compiled part of the eplb Python package. eplb::error becomes one of the exception classes
// of eplb._errors (a subclass of eplb.Error, with the errc name in .code), so callers can catch by
// kind: ValueError for bad input, TimeoutError for timeouts.
#include <pybind11/pybind11.h>

#include <string>

#include "bindings.hpp"
#include "eplb/error.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_eplb, m) {
  m.doc() = "eplb: expert-parallel load balancing (compiled module; use the eplb package)";
  m.attr("__version__") = EPLB_PY_VERSION;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const eplb::error& e) {
      const std::string code(eplb::to_string(e.code()));
      py::object cls = py::module_::import("eplb._errors").attr("error_class")(code);
      py::object exc = cls(e.what());
      exc.attr("code") = code;
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });
  eplb::python::bind_policy(m);
  eplb::python::bind_stores(m);
  eplb::python::bind_communicator(m);
  eplb::python::bind_state(m);
}

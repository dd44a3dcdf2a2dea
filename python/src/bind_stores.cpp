// Rendezvous stores for Python: eplb's own (in-process, file, TCP) and an adapter that lets eplb
// meet its peers through an engine's torch.distributed Store (or any object with set/get/add/wait).
#include <pybind11/chrono.h>
#include <pybind11/stl.h>

#include <fmt/format.h>

#include <memory>
#include <string>

#include "bindings.hpp"
#include "eplb/comm/store.hpp"
#include "eplb/error.hpp"
#include "store_handle.hpp"

namespace eplb::python {
namespace {

using comm::milliseconds;

// A C++ store whose operations call the Python object's methods. eplb calls stores from its own
// threads (rendezvous, CPU collectives) with the GIL released: each call takes the GIL only inside.
class python_store final : public comm::store {
 public:
  explicit python_store(py::object inner) : inner_(new py::object(std::move(inner))) {}
  ~python_store() override {
    if (Py_IsInitialized() == 0) return;  // interpreter gone: the reference dies with it
    py::gil_scoped_acquire gil;
    delete inner_;
  }
  python_store(const python_store&) = delete;
  python_store& operator=(const python_store&) = delete;

  void set(const std::string& key, const std::string& value) override {
    call("set", [&] { inner_->attr("set")(key, py::bytes(value)); });
  }
  std::string get(const std::string& key, milliseconds timeout) override {
    std::string out;
    bool timed_out = false;
    call("get", [&] {
      if (py::hasattr(*inner_, "wait")) {
        try {
          inner_->attr("wait")(py::list(py::make_tuple(key)), timeout);
        } catch (py::error_already_set& e) {
          if (!e.matches(PyExc_RuntimeError) && !e.matches(PyExc_TimeoutError)) throw;
          timed_out = true;
          return;
        }
      }
      out = inner_->attr("get")(key).cast<std::string>();
    });
    if (timed_out)
      throw error(errc::timeout, fmt::format("store key \"{}\" was not set within {} ms", key, timeout.count()));
    return out;
  }
  std::int64_t add(const std::string& key, std::int64_t delta) override {
    std::int64_t v = 0;
    call("add", [&] { v = inner_->attr("add")(key, delta).cast<std::int64_t>(); });
    return v;
  }
  std::string set_if_absent(const std::string& key, const std::string& value) override {
    std::string out;
    bool has_compare_set = false;
    bool claimed = false;
    call("set_if_absent", [&] {
      has_compare_set = py::hasattr(*inner_, "compare_set");
      if (has_compare_set) {
        out = inner_->attr("compare_set")(key, py::bytes(""), py::bytes(value)).cast<std::string>();
        return;
      }
      // Without compare_set: the first to bump the claim counter writes; the others read.
      claimed = inner_->attr("add")(key + "/claim", 1).cast<std::int64_t>() == 1;
      if (claimed) inner_->attr("set")(key, py::bytes(value));
    });
    if (has_compare_set) return out;
    return claimed ? value : get(key, milliseconds{300'000});
  }
  void erase(const std::string& key) override {
    call("erase", [&] {
      if (!py::hasattr(*inner_, "delete_key")) return;
      try {
        inner_->attr("delete_key")(key);
        if (!py::hasattr(*inner_, "compare_set")) inner_->attr("delete_key")(key + "/claim");
      } catch (py::error_already_set&) {
        // Stores without deletion (older FileStores) keep the key: it only costs space.
      }
    });
  }
  comm::store_usage usage() override {
    comm::store_usage u;
    call("usage", [&] {
      if (py::hasattr(*inner_, "num_keys")) u.keys = inner_->attr("num_keys")().cast<std::size_t>();
    });
    return u;
  }

 private:
  // Runs `fn` under the GIL; a Python exception becomes error(errc::transport) naming the method.
  template <typename F>
  void call(const char* what, F&& fn) {
    std::string failure;
    {
      py::gil_scoped_acquire gil;
      try {
        fn();
      } catch (py::error_already_set& e) {
        failure = e.what();
      } catch (py::cast_error& e) {
        failure = e.what();
      }
    }
    if (!failure.empty()) throw error(errc::transport, fmt::format("python store {}: {}", what, failure));
  }

  py::object* inner_;  // deleted under the GIL
};

}  // namespace

void bind_stores(py::module_& m) {
  py::class_<store_handle>(m, "Store", "A rendezvous key-value store eplb's ranks meet through.")
      .def("set",
           [](store_handle& h, const std::string& k, const py::bytes& v) {
             std::string value = v;
             py::gil_scoped_release nogil;
             h.s->set(k, value);
           })
      .def(
          "get",
          [](store_handle& h, const std::string& k, double timeout) {
            std::string v;
            {
              py::gil_scoped_release nogil;
              v = h.s->get(k, milliseconds(static_cast<std::int64_t>(timeout * 1000)));
            }
            return py::bytes(v);
          },
          py::arg("key"), py::arg("timeout") = 30.0)
      .def("add",
           [](store_handle& h, const std::string& k, std::int64_t d) {
             py::gil_scoped_release nogil;
             return h.s->add(k, d);
           })
      .def("set_if_absent",
           [](store_handle& h, const std::string& k, const py::bytes& v) {
             std::string value = v;
             std::string out;
             {
               py::gil_scoped_release nogil;
               out = h.s->set_if_absent(k, value);
             }
             return py::bytes(out);
           })
      .def("delete_key",
           [](store_handle& h, const std::string& k) {
             py::gil_scoped_release nogil;
             h.s->erase(k);
           })
      .def("num_keys",
           [](store_handle& h) {
             py::gil_scoped_release nogil;
             return h.s->usage().keys;
           })
      .def(
          "barrier",
          [](store_handle& h, const std::string& name, int count, double timeout) {
            py::gil_scoped_release nogil;
            comm::store_barrier(*h.s, name, count, milliseconds(static_cast<std::int64_t>(timeout * 1000)));
          },
          py::arg("name"), py::arg("count"), py::arg("timeout") = 30.0);

  py::class_<memory_store_handle, store_handle>(m, "MemoryStore", "In-process store (ranks are threads).")
      .def(py::init([] {
        return memory_store_handle{{comm::make_memory_store(), nullptr}};
      }));
  py::class_<file_store_handle, store_handle>(m, "FileStore", "Keys are files in a directory processes share.")
      .def(py::init([](const std::string& path) {
             return file_store_handle{{comm::make_file_store(path), nullptr}};
           }),
           py::arg("path"));
  py::class_<tcp_store_handle, store_handle>(m, "TCPStore", "TCP store; serve=True also runs the server here.")
      .def(py::init([](const std::string& host, int port, bool serve, double timeout) {
             if (port < 0 || port > 65535)
               throw error(errc::invalid_argument, fmt::format("port: {} is not in 0..65535", port));
             if (!serve && port == 0) throw error(errc::invalid_argument, "port: 0 needs serve=True");
             py::gil_scoped_release nogil;  // connecting retries until the server is up
             tcp_store_handle h;
             if (serve) h.server = std::make_shared<comm::tcp_store_server>(host, static_cast<std::uint16_t>(port));
             const auto p = serve ? h.server->port() : static_cast<std::uint16_t>(port);
             h.s = comm::make_tcp_store(host, p, milliseconds(static_cast<std::int64_t>(timeout * 1000)));
             h.port = p;
             return h;
           }),
           py::arg("host") = "127.0.0.1", py::arg("port") = 0, py::arg("serve") = false, py::arg("timeout") = 30.0)
      .def_readonly("port", &tcp_store_handle::port);
  py::class_<prefix_store_handle, store_handle>(m, "PrefixStore", "Every key of `store` seen through prefix/.")
      .def(py::init([](const store_handle& inner, const std::string& prefix) {
             return prefix_store_handle{{comm::make_prefix_store(inner.s, prefix), inner.server}};
           }),
           py::arg("store"), py::arg("prefix"));
  py::class_<torch_store_handle, store_handle>(
      m, "TorchStore",
      "Adapter over a torch.distributed Store (or any object with set/get/add/wait/delete_key), so that eplb\n"
      "meets its peers through the engine's own rendezvous.")
      .def(py::init([](py::object inner) {
             for (const char* method : {"set", "get", "add"})
               if (!py::hasattr(inner, method))
                 throw error(errc::invalid_argument, fmt::format("store: object has no {}() method", method));
             return torch_store_handle{{std::make_shared<python_store>(inner), nullptr}};
           }),
           py::arg("store"));
}

}  // namespace eplb::python

// Communicator for Python: add_send/add_recv on tensors (viewed in place, never copied), execute()
// without the GIL, set_stream() from a torch stream's handle.
#include <pybind11/stl.h>

#include <fmt/format.h>

#include <memory>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "bindings.hpp"
#include "device_handle.hpp"
#include "eplb/comm/communicator.hpp"
#include "eplb/error.hpp"
#include "store_handle.hpp"

namespace eplb::python {

std::unique_ptr<device::device> open_device(const std::string& kind, int ordinal) {
  const auto k = device::parse_backend_kind(kind == "cpu" ? "host" : kind);
  return device::make_device(k, k == device::backend_kind::cuda ? ordinal : 0);
}

namespace {

template <typename T>
T option(const py::handle& v, const std::string& key) {
  try {
    return v.cast<T>();
  } catch (const py::cast_error&) {
    throw error(errc::invalid_argument,
                fmt::format("{}: wrong type {}", key, py::str(py::type::of(v)).cast<std::string>()));
  }
}

}  // namespace

comm::options parse_options(const py::dict& kwargs) {
  comm::options o;
  for (const auto& [k, v] : kwargs) {
    const auto key = k.cast<std::string>();
    if (key == "timeout") {
      o.timeout = comm::milliseconds(static_cast<std::int64_t>(option<double>(v, key) * 1000));
      if (o.timeout.count() <= 0) throw error(errc::invalid_argument, "timeout: must be > 0 seconds");
    } else if (key == "chunk_bytes")
      o.chunk_bytes = option<std::size_t>(v, key);
    else if (key == "lanes")
      o.lanes = option<int>(v, key);
    else if (key == "staging_bytes")
      o.staging_bytes = option<std::size_t>(v, key);
    else if (key == "hostname")
      o.hostname = option<std::string>(v, key);
    else if (key == "nice")
      o.nice = option<int>(v, key);
    else if (key == "gloo_transport")
      o.gloo_via = comm::parse_gloo_transport(option<std::string>(v, key));
    else if (key == "cuda_ipc_pull")
      o.cuda_ipc_pull = option<bool>(v, key);
    else if (key == "max_gbps")
      o.cuda_ipc_max_gbps = option<double>(v, key);
    else
      throw error(errc::invalid_argument,
                  fmt::format("{}: unknown option (known: timeout, chunk_bytes, lanes, staging_bytes, hostname, nice, "
                              "gloo_transport, cuda_ipc_pull, max_gbps)",
                              key));
  }
  return o;
}

void check_placement(const tensor_view& t, std::string_view arg, const device::device& dev, comm::capabilities caps) {
  const auto d = t.device();
  if (d.cuda && dev.kind() != device::backend_kind::cuda)
    throw error(errc::invalid_argument,
                fmt::format("{}: is on cuda:{}, but this communicator was made for device \"cpu\"", arg, d.ordinal));
  if (d.cuda && d.ordinal != dev.ordinal())
    throw error(errc::invalid_argument,
                fmt::format("{}: is on cuda:{}, but this communicator uses cuda:{}", arg, d.ordinal, dev.ordinal()));
  if (d.cuda && !caps.device_memory)
    throw error(errc::invalid_argument, fmt::format("{}: this backend takes host memory only", arg));
  if (!d.cuda && !caps.host_memory)
    throw error(errc::invalid_argument, fmt::format("{}: this backend takes device memory only (a CUDA tensor)", arg));
}

namespace {

class communicator_handle {
 public:
  communicator_handle(const std::string& backend, int rank, int size, const py::object& store,
                      const std::string& dev_kind, int ordinal, const py::object& world, const py::dict& kwargs) {
    comm::setup s;
    s.rank = rank;
    s.size = size;
    s.opts = parse_options(kwargs);
    const auto kind = comm::parse_backend(backend);
    if (!store.is_none()) {
      store_ = store.cast<store_handle>();
      s.rendezvous = store_.s;
    }
    if (!world.is_none()) s.world = world.cast<world_handle&>().world;
    if (kind == comm::backend::loopback && s.world == nullptr)
      throw error(errc::invalid_argument, "world: the loopback backend needs a LoopbackWorld shared by its ranks");
    dev_ = open_device(dev_kind, ordinal);
    s.dev = dev_.get();
    py::gil_scoped_release nogil;  // rendezvous waits for the peers
    comm_ = comm::make_communicator(kind, s);
  }
  ~communicator_handle() { close(); }
  communicator_handle(const communicator_handle&) = delete;
  communicator_handle& operator=(const communicator_handle&) = delete;

  void add(const py::handle& tensor, int peer, bool send) {
    auto c = live();
    auto v = tensor_view::of(tensor, "tensor", !send);
    check_placement(v, "tensor", *dev_, c->caps());
    if (send)
      c->add_send(v.span(), peer);
    else
      c->add_recv(v.span(), peer);
    queued_.push_back(std::move(v));  // the memory stays borrowed until execute() ends
  }

  void execute() {
    auto c = live();
    try {
      py::gil_scoped_release nogil;
      c->execute();
    } catch (...) {
      queued_.clear();
      throw;
    }
    queued_.clear();
  }

  void set_stream(std::uintptr_t handle) {
    auto c = live();
    if (handle == 0) {
      c->set_stream(nullptr);
      stream_.reset();
      return;
    }
    auto wrapped = dev_->wrap_stream(reinterpret_cast<void*>(handle));
    c->set_stream(wrapped.get());
    stream_ = std::move(wrapped);
  }

  void close() {
    queued_.clear();
    if (comm_ == nullptr) return;
    py::gil_scoped_release nogil;  // the transport's threads may call a Python store
    comm_.reset();
  }

  [[nodiscard]] comm::communicator* live() const {
    if (comm_ == nullptr) throw error(errc::invalid_argument, "communicator: already closed");
    return comm_.get();
  }
  [[nodiscard]] const device::device& dev() const { return *dev_; }

 private:
  store_handle store_;
  std::unique_ptr<device::device> dev_;
  std::unique_ptr<device::stream> stream_;
  std::unique_ptr<comm::communicator> comm_;  // after the device and stream it uses: destroyed first
  std::vector<tensor_view> queued_;
};

py::dict capabilities(const comm::capabilities& c) {
  py::dict d;
  d["stream_ordered"] = c.stream_ordered;
  d["host_complete"] = c.host_complete;
  d["background_safe"] = c.background_safe;
  d["crosses_nodes"] = c.crosses_nodes;
  d["device_memory"] = c.device_memory;
  d["host_memory"] = c.host_memory;
  return d;
}

}  // namespace

void bind_communicator(py::module_& m) {
  py::class_<world_handle>(m, "LoopbackWorld", "The shared group of a loopback communicator (ranks are threads).")
      .def(py::init([](int size) {
             return world_handle{comm::make_loopback_world(size), size};
           }),
           py::arg("size"))
      .def_readonly("size", &world_handle::size)
      .def("mark_dead", [](world_handle& w, int rank) { comm::mark_dead(*w.world, rank); });

  py::class_<communicator_handle>(m, "_Communicator")
      .def(py::init<const std::string&, int, int, const py::object&, const std::string&, int, const py::object&,
                    const py::dict&>(),
           py::arg("backend"), py::arg("rank"), py::arg("size"), py::arg("store"), py::arg("device_kind"),
           py::arg("ordinal"), py::arg("world"), py::arg("options"))
      .def("add_send", [](communicator_handle& h, const py::handle& t, int dst) { h.add(t, dst, true); })
      .def("add_recv", [](communicator_handle& h, const py::handle& t, int src) { h.add(t, src, false); })
      .def("execute", &communicator_handle::execute)
      .def("set_stream", &communicator_handle::set_stream)
      .def("close", &communicator_handle::close)
      .def_property_readonly("rank", [](const communicator_handle& h) { return h.live()->rank(); })
      .def_property_readonly("size", [](const communicator_handle& h) { return h.live()->size(); })
      .def_property_readonly("backend",
                             [](const communicator_handle& h) { return std::string(to_string(h.live()->kind())); })
      .def_property_readonly("pending", [](const communicator_handle& h) { return h.live()->pending(); })
      .def_property_readonly("capabilities",
                             [](const communicator_handle& h) { return capabilities(h.live()->caps()); });

  m.def("backends", [] {
    py::list out;
    for (const auto& b : comm::backend_report()) {
      py::dict d;
      d["name"] = std::string(to_string(b.kind));
      d["built"] = b.built;
      d["runnable"] = b.runnable;
      d["reason"] = b.reason;
      out.append(d);
    }
    return out;
  });
}

}  // namespace eplb::python

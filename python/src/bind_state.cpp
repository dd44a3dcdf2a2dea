// State for Python: an eplb_state over the engine's weight tensors (viewed in place), with the load
// buffer and the maps exported as tensors that alias eplb's memory.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "bindings.hpp"
#include "device_handle.hpp"
#include "eplb/error.hpp"
#include "eplb/state.hpp"
#include "store_handle.hpp"

namespace eplb::python {
namespace {

// A rebalance_record as a dict with the C++ field names (outcome as its name).
py::dict record_dict(const rebalance_record& r) {
  py::dict d;
  d["id"] = r.id;
  d["trigger_step"] = r.trigger_step;
  d["start_step"] = r.start_step;
  d["first_commit_step"] = r.first_commit_step;
  d["end_step"] = r.end_step;
  d["outcome"] = std::string(to_string(r.outcome));
  d["error"] = r.error;
  d["communicator_generation"] = r.communicator_generation;
  d["balancedness_before"] = r.balancedness_before;
  d["balancedness_after"] = r.balancedness_after;
  d["balancedness_ideal"] = r.balancedness_ideal;
  d["layers_committed"] = r.layers_committed;
  d["bytes_sent"] = r.bytes_sent;
  d["bytes_received"] = r.bytes_received;
  d["bytes_same_node"] = r.bytes_same_node;
  d["bytes_cross_node"] = r.bytes_cross_node;
  d["bytes_per_peer"] = r.bytes_per_peer;
  d["plan_seconds"] = r.plan_seconds;
  d["transfer_seconds"] = r.transfer_seconds;
  d["commit_seconds"] = r.commit_seconds;
  d["total_seconds"] = r.total_seconds;
  return d;
}

struct state_args {
  std::string config_json;
  py::list weights;  // layers x tensors, each [slots_per_rank, ...]
  int num_experts = 0;
  int rank = 0;
  int num_ranks = 1;
  int num_groups = 1;
  int num_nodes = 1;
  int ranks_per_node = 0;
  py::dict buffers;  // the engine's own load / map tensors, by name (optional)
  std::int64_t join_epoch = 0;
  py::object reload_expert;  // None or callable(layer, expert, local_slot)
};

// A Python callable eplb may call from a thread without the GIL, and may drop without it: the
// call and the last reference take the GIL; a Python exception becomes a C++ one with its text.
std::function<void(int, int, int)> gil_callable(const py::object& f) {
  if (f.is_none()) return {};
  std::shared_ptr<py::object> held(new py::object(f), [](py::object* o) {
    py::gil_scoped_acquire gil;
    delete o;
  });
  return [held](int a, int b, int c) {
    py::gil_scoped_acquire gil;
    try {
      (*held)(a, b, c);
    } catch (py::error_already_set& e) {
      throw std::runtime_error(e.what());
    }
  };
}

py::dict report_dict(const rescale_report& r) {
  py::dict d;
  d["epoch"] = r.epoch;
  d["left"] = r.left;
  d["rank"] = r.rank;
  d["num_ranks"] = r.num_ranks;
  d["layers_moved"] = r.layers_moved;
  d["bytes_received"] = r.bytes_received;
  d["seconds"] = r.seconds;
  d["fill_error"] = r.fill_error;
  d["lost_ranks"] = r.lost_ranks;
  d["experts_reloaded"] = r.experts_reloaded;
  py::list masked;
  for (const auto& x : r.masked) masked.append(py::make_tuple(x.layer, x.expert));
  d["masked"] = masked;
  return d;
}

class state_handle {
 public:
  state_handle(const state_args& a, const store_handle& store, const std::string& dev_kind, int ordinal,
               const py::object& world, const py::dict& comm_options, std::uintptr_t serving_stream) {
    dev_ = open_device(dev_kind, ordinal);
    stream_ = serving_stream != 0 ? dev_->wrap_stream(reinterpret_cast<void*>(serving_stream)) : dev_->create_stream();
    state_params p;
    p.cfg = config::from_json(a.config_json);
    p.rank = a.rank;
    p.dev = dev_.get();
    p.serving_stream = stream_.get();
    p.store = store.s;
    p.comm_setup.opts = parse_options(comm_options);
    if (!world.is_none()) p.comm_setup.world = world.cast<world_handle&>().world;
    p.model = {.shape = shape_of(a, p.weights), .num_groups = a.num_groups, .num_nodes = a.num_nodes};
    if (p.cfg.num_redundant_experts == 0) p.cfg.num_redundant_experts = p.model.shape.num_physical - a.num_experts;
    p.buffers = engine_buffers_of(a.buffers, p.model.shape);
    p.join_epoch = a.join_epoch;
    p.reload_expert = gil_callable(a.reload_expert);
    shape_ = p.model.shape;
    opts_ = p.comm_setup.opts;
    store_ = store;
    py::gil_scoped_release nogil;  // creating the communicator meets the peers
    state_ = std::make_unique<eplb_state>(std::move(p));
  }
  ~state_handle() { stop(); }
  state_handle(const state_handle&) = delete;
  state_handle& operator=(const state_handle&) = delete;

  py::dict step(bool is_dummy) {
    step_report r;
    {
      py::gil_scoped_release nogil;
      r = live().step(is_dummy);
    }
    py::dict d;
    d["rebalance_started"] = r.rebalance_started;
    d["rebalance_finished"] = r.rebalance_finished;
    d["rebalance_skipped"] = r.rebalance_skipped;
    d["layers_committed"] = r.layers_committed;
    d["started_id"] = r.started_id;
    d["masked_experts"] = r.masked_experts;
    d["finished"] = r.finished ? py::object(record_dict(*r.finished)) : py::object(py::none());
    return d;
  }

  py::list history() {
    py::list out;
    for (const auto& r : live().history()) out.append(record_dict(r));
    return out;
  }

  std::string prometheus_text(const std::string& prefix) { return live().prometheus_text(prefix); }

  void record_load(int layer, const py::handle& counts) {
    auto v = tensor_view::of(counts, "counts", false);
    v.require_host("counts");
    if (v.type() != dtype{dtype_kind::int_, 64})
      throw error(errc::invalid_argument, fmt::format("counts: dtype {} is not int64", to_string(v.type())));
    live().record_load(layer, {reinterpret_cast<const std::int64_t*>(v.data()), static_cast<std::size_t>(v.numel())});
  }

  // Commits update the device maps in serving-stream order: waits for what is queued there.
  void synchronize(double timeout) {
    live();
    py::gil_scoped_release nogil;
    stream_->synchronize(comm::milliseconds(static_cast<std::int64_t>(timeout * 1000)));
  }

  void drain() {
    if (state_ != nullptr) state_->drain();
  }

  void stop() {
    if (state_ == nullptr) return;
    py::gil_scoped_release nogil;
    state_->stop();
    state_.reset();
  }

  // A DLPack capsule over eplb's memory, keeping this state's Python object alive.
  py::object table(const py::object& self, const char* which) {
    auto& s = live();
    if (engine_.contains(which)) return engine_[which];  // the engine's own tensor, as it gave it
    const auto& m = s.maps();
    const std::int64_t layers = m.layers();
    if (std::string_view(which) == "load")
      return export_dlpack(s.load_buffer(), {layers, m.num_physical()}, {dtype_kind::int_, 64}, ordinal(), self);
    if (std::string_view(which) == "phy2log")
      return export_dlpack(const_cast<std::int32_t*>(s.device_phy2log()), {layers, m.num_physical()},
                           {dtype_kind::int_, 32}, ordinal(), self);
    if (std::string_view(which) == "log2phy")
      return export_dlpack(const_cast<std::int32_t*>(s.device_log2phy()),
                           {layers, m.num_logical(), s.device_max_replicas()}, {dtype_kind::int_, 32}, ordinal(), self);
    return export_dlpack(const_cast<std::int32_t*>(s.device_replica_count()), {layers, m.num_logical()},
                         {dtype_kind::int_, 32}, ordinal(), self);
  }

  // numpy marks DLPack imports read-only; the router's counts must be writable: a plain view.
  py::array_t<std::int64_t> load_array(const py::object& self) {
    auto& s = live();
    if (ordinal() >= 0) throw error(errc::invalid_argument, "load_buffer: in device memory; use torch tensors");
    const auto& m = s.maps();
    return py::array_t<std::int64_t>({static_cast<py::ssize_t>(m.layers()), static_cast<py::ssize_t>(m.num_physical())},
                                     s.load_buffer(), self);
  }

  py::array_t<std::int32_t> maps() {
    const auto& m = live().maps();
    py::array_t<std::int32_t> out({static_cast<py::ssize_t>(m.layers()), static_cast<py::ssize_t>(m.num_physical())});
    std::copy(m.phy2log().flat().begin(), m.phy2log().flat().end(), out.mutable_data());
    return out;
  }

  py::dict metrics() {
    const auto& x = live().stats();
    py::dict d;
    d["steps"] = x.steps;
    d["rebalances"] = x.rebalances;
    d["layers_committed"] = x.layers_committed;
    d["bytes_moved"] = x.bytes_moved;
    d["plan_seconds"] = x.plan_seconds;
    d["rebalance_seconds"] = x.rebalance_seconds;
    d["balancedness_before"] = x.balancedness_before;
    d["balancedness_after"] = x.balancedness_after;
    d["rebalance_in_flight"] = x.rebalance_in_flight;
    d["rebalances_skipped"] = x.rebalances_skipped;
    d["rebalances_failed"] = x.rebalances_failed;
    d["rank_set_epoch"] = x.rank_set_epoch;
    d["masked_experts"] = x.masked_experts;
    return d;
  }

  // Elastic EP: the new set's loopback world (threads) and the engine's buffers for its size.
  py::dict rescale(int new_size, std::vector<int> mapping, const py::object& world, const py::object& buffers) {
    auto& s = live();
    rescale_params p{.new_size = new_size, .rank_mapping = std::move(mapping)};
    if (!world.is_none()) p.comm_setup = comm::setup{.world = world.cast<world_handle&>().world, .opts = opts_};
    if (!buffers.is_none()) p.buffers = engine_buffers_of(buffers.cast<py::dict>(), resized(new_size));
    rescale_report r;
    {
      py::gil_scoped_release nogil;
      r = s.rescale(std::move(p));
    }
    return report_dict(r);  // a rank that left keeps its stopped state: its maps stay readable
  }

  // Serving on after lost ranks. The factories are called (with the GIL) for the survivors' size;
  // the caller's references keep them alive through the call.
  py::dict recover(const py::object& world_factory, const py::object& buffers_factory) {
    auto& s = live();
    recover_params p;
    const py::handle worlds = world_factory, buffers = buffers_factory;
    if (!worlds.is_none()) {
      p.comm_setup = [this, worlds](int size) {
        py::gil_scoped_acquire gil;
        return comm::setup{.world = worlds(size).cast<world_handle&>().world, .opts = opts_};
      };
    }
    if (!buffers.is_none()) {
      p.buffers = [this, buffers](int size) {
        py::gil_scoped_acquire gil;
        return engine_buffers_of(buffers(size).cast<py::dict>(), resized(size));
      };
    }
    rescale_report r;
    {
      py::gil_scoped_release nogil;
      r = s.recover(std::move(p));
    }
    return report_dict(r);
  }

  py::dict restore_masked() {
    auto& s = live();
    rescale_report r;
    {
      py::gil_scoped_release nogil;  // the reload hook takes the GIL for its calls
      r = s.restore_masked();
    }
    return report_dict(r);
  }

  py::list masked_experts() {
    py::list out;
    for (const auto& x : live().masked_experts()) out.append(py::make_tuple(x.layer, x.expert));
    return out;
  }

  [[nodiscard]] int rank() { return live().rank(); }
  [[nodiscard]] int num_ranks() { return live().num_ranks(); }

  [[nodiscard]] bool has_engine(const std::string& which) const { return engine_.contains(which); }

  [[nodiscard]] std::string communicator() { return std::string(to_string(live().communicator_kind())); }

 private:
  [[nodiscard]] int ordinal() const { return dev_->kind() == device::backend_kind::cuda ? dev_->ordinal() : -1; }
  eplb_state& live() const {
    if (state_ == nullptr) throw error(errc::invalid_argument, "state: already stopped");
    return *state_;
  }

  exec::model_shape shape_of(const state_args& a, exec::rank_weights& w) {
    if (a.weights.empty()) throw error(errc::invalid_argument, "weights: needs at least one layer");
    exec::model_shape s{.layers = static_cast<int>(a.weights.size()),
                        .num_logical = a.num_experts,
                        .num_ranks = a.num_ranks,
                        .ranks_per_node = a.ranks_per_node};
    std::int64_t slots = -1;
    for (std::size_t l = 0; l < a.weights.size(); ++l) {
      const auto tensors = a.weights[l].cast<py::list>();
      if (l > 0 && tensors.size() != s.bundle.size())
        throw error(errc::invalid_argument,
                    fmt::format("weights[{}]: {} tensors, layer 0 has {}", l, tensors.size(), s.bundle.size()));
      w.base.emplace_back();
      for (std::size_t t = 0; t < tensors.size(); ++t) {
        const auto arg = fmt::format("weights[{}][{}]", l, t);
        auto v = tensor_view::of(tensors[t], arg, true);
        if (v.shape().empty() || (slots >= 0 && v.shape()[0] != slots))
          throw error(errc::invalid_argument,
                      fmt::format("{}: the first dimension must be the {} local slots", arg, slots));
        slots = v.shape()[0];
        const std::size_t per_expert = v.bytes() / static_cast<std::size_t>(slots);
        if (l == 0) {
          s.bundle.push_back({fmt::format("tensor{}", t), per_expert, per_expert,
                              v.device().cuda ? device::memory_kind::device : device::memory_kind::host});
        } else if (per_expert != s.bundle[t].bytes_per_expert) {
          throw error(errc::invalid_argument, fmt::format("{}: {} bytes per expert, layer 0 has {}", arg, per_expert,
                                                          s.bundle[t].bytes_per_expert));
        }
        w.base.back().push_back(v.data());
        views_.push_back(std::move(v));
      }
    }
    s.num_physical = static_cast<int>(slots) * a.num_ranks;
    return s;
  }

  // The engine's tensors for eplb's load buffer and maps: int32 or int64, contiguous, writable, on
  // the state's device, of the layout eplb's own buffers have (state.hpp's engine_buffers).
  engine_buffers engine_buffers_of(const py::dict& given, const exec::model_shape& s) {
    const std::int64_t layers = s.layers, slots = s.num_physical, experts = s.num_logical;
    const std::int64_t width = slots - experts + 1;  // device_max_replicas()
    const std::pair<const char*, std::vector<std::int64_t>> layouts[] = {{"load", {layers, slots}},
                                                                         {"phy2log", {layers, slots}},
                                                                         {"log2phy", {layers, experts, width}},
                                                                         {"replica_count", {layers, experts}}};
    engine_buffers out;
    std::optional<engine_buffer>* slots_of[] = {&out.load, &out.phy2log, &out.log2phy, &out.replica_count};
    for (const auto& [k, v] : given) {
      const auto key = k.cast<std::string>();
      const auto at =
          std::find_if(std::begin(layouts), std::end(layouts), [&](const auto& l) { return key == l.first; });
      if (at == std::end(layouts))
        throw error(errc::invalid_argument,
                    fmt::format("buffers: unknown key '{}' (allowed: load, phy2log, log2phy, replica_count)", key));
      *slots_of[at - std::begin(layouts)] = engine_buffer_of(v, "buffers." + key, at->second);
      engine_[py::str(key)] = py::reinterpret_borrow<py::object>(v);
    }
    return out;
  }

  engine_buffer engine_buffer_of(const py::handle& obj, const std::string& arg, const std::vector<std::int64_t>& want) {
    auto v = tensor_view::of(obj, arg, true);
    if (v.type() != dtype{dtype_kind::int_, 32} && v.type() != dtype{dtype_kind::int_, 64})
      throw error(errc::invalid_argument,
                  fmt::format("{}: dtype {} (int32 or int64 wanted)", arg, to_string(v.type())));
    if (v.shape() != want)
      throw error(errc::invalid_argument,
                  fmt::format("{}: shape [{}], wanted [{}]", arg, fmt::join(v.shape(), ", "), fmt::join(want, ", ")));
    if (v.device().ordinal != ordinal())
      throw error(errc::invalid_argument,
                  fmt::format("{}: on {}, the state's device is {}", arg, where(v.device().ordinal), where(ordinal())));
    const engine_buffer b{v.data(), v.type().bits == 32 ? element_type::int32 : element_type::int64};
    views_.push_back(std::move(v));
    return b;
  }

  // The model's shape with `size` ranks (the slots per rank stay).
  [[nodiscard]] exec::model_shape resized(int size) const {
    auto s = shape_;
    s.num_physical = s.num_physical / s.num_ranks * size;
    s.num_ranks = size;
    return s;
  }

  static std::string where(int ordinal) { return ordinal < 0 ? "the host" : fmt::format("cuda:{}", ordinal); }

  store_handle store_;
  exec::model_shape shape_;  // of the first set
  comm::options opts_;
  py::dict engine_;                 // the engine's tensors by name, handed back by table()
  std::vector<tensor_view> views_;  // the weights stay borrowed while the state lives
  std::unique_ptr<device::device> dev_;
  std::unique_ptr<device::stream> stream_;
  std::unique_ptr<eplb_state> state_;  // last: destroyed first
};

}  // namespace

void bind_state(py::module_& m) {
  py::class_<state_handle>(m, "_State")
      .def(py::init([](const std::string& cfg, py::list weights, int num_experts, int rank, int num_ranks,
                       const store_handle& store, const std::string& dev_kind, int ordinal, int num_groups,
                       int num_nodes, int ranks_per_node, const py::object& world, const py::dict& comm_options,
                       std::uintptr_t serving_stream, py::dict buffers, std::int64_t join_epoch,
                       py::object reload_expert) {
        const state_args a{cfg,
                           std::move(weights),
                           num_experts,
                           rank,
                           num_ranks,
                           num_groups,
                           num_nodes,
                           ranks_per_node,
                           std::move(buffers),
                           join_epoch,
                           std::move(reload_expert)};
        return std::make_unique<state_handle>(a, store, dev_kind, ordinal, world, comm_options, serving_stream);
      }))
      .def("step", &state_handle::step, py::arg("is_dummy") = false)
      .def("record_load", &state_handle::record_load)
      .def("drain", &state_handle::drain)
      .def("stop", &state_handle::stop)
      .def("synchronize", &state_handle::synchronize, py::arg("timeout") = 60.0)
      .def("table", [](state_handle& h, const py::object& self,
                       const std::string& which) { return h.table(self, which.c_str()); })
      .def("has_engine_buffer", [](state_handle& h, const std::string& which) { return h.has_engine(which); })
      .def("load_array", [](state_handle& h, const py::object& self) { return h.load_array(self); })
      .def("maps", &state_handle::maps)
      .def("metrics", &state_handle::metrics)
      .def("history", &state_handle::history)
      .def("prometheus_text", &state_handle::prometheus_text, py::arg("prefix") = "eplb")
      .def("rescale", &state_handle::rescale)
      .def("recover", &state_handle::recover)
      .def("masked_experts", &state_handle::masked_experts)
      .def("restore_masked", &state_handle::restore_masked)
      .def_property_readonly("rank", &state_handle::rank)
      .def_property_readonly("num_ranks", &state_handle::num_ranks)
      .def_property_readonly("communicator", &state_handle::communicator);
}

}  // namespace eplb::python

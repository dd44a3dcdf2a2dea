// rebalance(): the placement policies on a weight table, returning vLLM's three maps as numpy arrays
// (the Python layer turns them into tensors of the input's kind).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <fmt/format.h>

#include <optional>
#include <string>

#include "arrays.hpp"
#include "bindings.hpp"
#include "eplb/core/policy.hpp"
#include "eplb/error.hpp"

namespace eplb::python {
namespace {

template <typename T>
double element(const std::byte* p, std::int64_t i) {
  return static_cast<double>(reinterpret_cast<const T*>(p)[i]);
}

double read_number(const tensor_view& v, std::int64_t i) {
  const dtype t = v.type();
  if (t == dtype{dtype_kind::float_, 32}) return element<float>(v.data(), i);
  if (t == dtype{dtype_kind::float_, 64}) return element<double>(v.data(), i);
  if (t == dtype{dtype_kind::int_, 32}) return element<std::int32_t>(v.data(), i);
  return element<std::int64_t>(v.data(), i);
}

void require_dtype(const tensor_view& v, std::string_view arg, bool floats) {
  const dtype t = v.type();
  const bool is_int = t == dtype{dtype_kind::int_, 32} || t == dtype{dtype_kind::int_, 64};
  const bool is_float = t == dtype{dtype_kind::float_, 32} || t == dtype{dtype_kind::float_, 64};
  if (!(is_int || (floats && is_float)))
    throw error(errc::invalid_argument, fmt::format("{}: dtype {} is not supported (use {})", arg, to_string(t),
                                                    floats ? "float32, float64, int32 or int64" : "int32 or int64"));
}

matrix<double> read_weight(const py::handle& obj) {
  const auto v = tensor_view::of(obj, "weight", false);
  v.require_host("weight");
  v.require_ndim("weight", 2);
  require_dtype(v, "weight", true);
  matrix<double> out(static_cast<std::size_t>(v.shape()[0]), static_cast<std::size_t>(v.shape()[1]));
  for (std::int64_t i = 0; i < v.numel(); ++i) out.flat()[static_cast<std::size_t>(i)] = read_number(v, i);
  return out;
}

matrix<expert_id> read_old(const py::handle& obj) {
  const auto v = tensor_view::of(obj, "old", false);
  v.require_host("old");
  v.require_ndim("old", 2);
  require_dtype(v, "old", false);
  matrix<expert_id> out(static_cast<std::size_t>(v.shape()[0]), static_cast<std::size_t>(v.shape()[1]));
  for (std::int64_t i = 0; i < v.numel(); ++i) {
    const double x = read_number(v, i);
    if (x < -1 || x > 1e9)
      throw error(errc::invalid_argument, fmt::format("old: expert id {} at flat index {} is out of range", x, i));
    out.flat()[static_cast<std::size_t>(i)] = static_cast<expert_id>(x);
  }
  return out;
}

// Errors of the C++ policy name its own fields (load, old_phy2log): say the Python names instead.
error renamed(const error& e) {
  std::string msg = e.what();
  for (auto [from, to] : {std::pair{"old_phy2log", "old"}, std::pair{"load", "weight"}})
    if (msg.rfind(from, 0) == 0) {
      msg.replace(0, std::string_view(from).size(), to);
      break;
    }
  return error(e.code(), msg);
}

py::tuple rebalance(const py::handle& weight, int num_replicas, int num_groups, int num_nodes, int num_ranks,
                    const py::handle& old, const std::string& policy) {
  const policy_kind kind = parse_policy(policy, "policy");
  const matrix<double> load = read_weight(weight);
  std::optional<matrix<expert_id>> old_map;
  if (!old.is_none()) old_map = read_old(old);
  const rebalance_input in{load, num_replicas, num_groups, num_nodes, num_ranks, old_map ? &*old_map : nullptr};
  std::optional<placement> p;
  try {
    py::gil_scoped_release nogil;  // up to seconds on the largest shapes
    p.emplace(rebalance(kind, in), static_cast<int>(load.cols()), num_ranks);
  } catch (const error& e) {
    throw renamed(e);
  }
  const auto layers = static_cast<py::ssize_t>(p->layers());
  const auto experts = static_cast<py::ssize_t>(p->num_logical());
  const auto slots = static_cast<py::ssize_t>(p->num_physical());
  // vLLM's width: the most replicas one expert can get.
  const auto width = static_cast<py::ssize_t>(num_replicas - experts + 1);
  py::array_t<std::int64_t> phy2log({layers, slots});
  py::array_t<std::int64_t> log2phy({layers, experts, width});
  py::array_t<std::int64_t> counts({layers, experts});
  auto a = phy2log.mutable_unchecked<2>();
  auto b = log2phy.mutable_unchecked<3>();
  auto c = counts.mutable_unchecked<2>();
  for (py::ssize_t l = 0; l < layers; ++l) {
    for (py::ssize_t s = 0; s < slots; ++s) a(l, s) = p->phy2log()(l, s);
    for (py::ssize_t e = 0; e < experts; ++e) {
      c(l, e) = p->replica_count(static_cast<int>(l), static_cast<int>(e));
      const auto row = p->log2phy(static_cast<int>(l), static_cast<int>(e));
      for (py::ssize_t r = 0; r < width; ++r) b(l, e, r) = r < static_cast<py::ssize_t>(row.size()) ? row[r] : -1;
    }
  }
  return py::make_tuple(phy2log, log2phy, counts);
}

}  // namespace

void bind_policy(py::module_& m) {
  m.def("_rebalance", &rebalance, py::arg("weight"), py::arg("num_replicas"), py::arg("num_groups"),
        py::arg("num_nodes"), py::arg("num_ranks"), py::arg("old") = py::none(), py::arg("policy") = "default");
}

}  // namespace eplb::python

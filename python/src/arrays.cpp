#include "arrays.hpp"

#include <fmt/format.h>

#include <numeric>

#include "eplb/error.hpp"

namespace eplb::python {
namespace {

// The DLPack ABI (v0.x, the unversioned "dltensor" capsule every producer we meet exports): declared
// here from the specification so that no header is needed.
struct dl_device {
  std::int32_t type;  // 1 CPU, 2 CUDA, 3 CUDA host (pinned), 13 CUDA managed
  std::int32_t id;
};
struct dl_dtype {
  std::uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct dl_tensor {
  void* data;
  dl_device device;
  std::int32_t ndim;
  dl_dtype dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null means compact row-major
  std::uint64_t byte_offset;
};
struct dl_managed_tensor {
  dl_tensor tensor;
  void* manager_ctx;
  void (*deleter)(dl_managed_tensor*);
};
constexpr const char* capsule_name = "dltensor";

[[noreturn]] void refuse(std::string_view arg, const std::string& why) {
  throw error(errc::invalid_argument, fmt::format("{}: {}", arg, why));
}

dtype from_format(std::string_view format, std::size_t itemsize) {
  while (!format.empty() && std::string_view("@=<>!").find(format.front()) != std::string_view::npos)
    format.remove_prefix(1);
  const int bits = static_cast<int>(itemsize * 8);
  if (format.size() != 1) return {dtype_kind::other, bits};
  switch (format.front()) {
    case 'b':
    case 'h':
    case 'i':
    case 'l':
    case 'q':
    case 'n':
      return {dtype_kind::int_, bits};
    case 'B':
    case 'H':
    case 'I':
    case 'L':
    case 'Q':
    case 'N':
      return {dtype_kind::uint, bits};
    case 'e':
    case 'f':
    case 'd':
      return {dtype_kind::float_, bits};
    case '?':
      return {dtype_kind::bool_, bits};
    default:
      return {dtype_kind::other, bits};
  }
}

dtype from_dl(dl_dtype t) {
  const int bits = t.bits * t.lanes;
  switch (t.code) {
    case 0:
      return {dtype_kind::int_, bits};
    case 1:
      return {dtype_kind::uint, bits};
    case 2:
      return {dtype_kind::float_, bits};
    case 4:
      return {dtype_kind::bfloat, bits};
    case 5:
      return {dtype_kind::complex_, bits};
    case 6:
      return {dtype_kind::bool_, bits};
    default:
      return {dtype_kind::other, bits};
  }
}

// Row-major contiguity; dimensions of extent 1 may carry any stride (torch gives them odd ones).
bool row_major(const std::vector<std::int64_t>& shape, const std::int64_t* strides, std::int64_t unit) {
  if (strides == nullptr) return true;
  std::int64_t expected = unit;
  for (std::size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

}  // namespace

std::string to_string(dtype t) {
  const char* names[] = {"int", "uint", "float", "bfloat", "complex", "bool", "other"};
  return fmt::format("{}{}", names[static_cast<int>(t.kind)], t.bits);
}

std::int64_t tensor_view::numel() const noexcept {
  return std::accumulate(shape_.begin(), shape_.end(), std::int64_t{1}, std::multiplies<>());
}

void tensor_view::require_ndim(std::string_view arg, std::size_t ndim) const {
  if (shape_.size() != ndim)
    refuse(arg,
           fmt::format("expected {} dimensions, got {} (shape [{}])", ndim, shape_.size(), fmt::join(shape_, ", ")));
}

void tensor_view::require_host(std::string_view arg) const {
  if (device_.cuda) refuse(arg, fmt::format("must be in host memory, got a tensor on cuda:{}", device_.ordinal));
}

tensor_view tensor_view::of(const py::handle& obj, std::string_view arg, bool writable) {
  tensor_view v;
  v.owner_ = py::reinterpret_borrow<py::object>(obj);
  if (PyObject_CheckBuffer(obj.ptr()) != 0) {
    PyObject* mv = PyMemoryView_FromObject(obj.ptr());
    if (mv == nullptr) throw py::error_already_set();
    v.buffer_ = py::reinterpret_steal<py::object>(mv);
    const Py_buffer* b = PyMemoryView_GET_BUFFER(mv);
    if (writable && b->readonly != 0) refuse(arg, "is read-only; a writable tensor is needed");
    if (PyBuffer_IsContiguous(b, 'C') == 0) refuse(arg, "is not C-contiguous (make it contiguous first)");
    v.data_ = static_cast<std::byte*>(b->buf);
    v.bytes_ = static_cast<std::size_t>(b->len);
    for (int i = 0; i < b->ndim; ++i) v.shape_.push_back(b->shape != nullptr ? b->shape[i] : b->len / b->itemsize);
    v.type_ = from_format(b->format != nullptr ? b->format : "B", static_cast<std::size_t>(b->itemsize));
    return v;
  }
  if (!py::hasattr(obj, "__dlpack__"))
    refuse(arg, fmt::format("expected a tensor or array (buffer protocol or __dlpack__), got {}",
                            py::str(py::type::of(obj)).cast<std::string>()));
  try {
    // A CUDA producer is told not to synchronise (stream -1): eplb orders its copies on the stream
    // given to set_stream, and torch would otherwise record and wait on an event per tensor.
    bool cuda = false;
    if (py::hasattr(obj, "__dlpack_device__"))
      cuda = obj.attr("__dlpack_device__")().cast<py::tuple>()[0].cast<int>() == 2;
    v.capsule_ = cuda ? obj.attr("__dlpack__")(py::arg("stream") = -1) : obj.attr("__dlpack__")();
  } catch (py::error_already_set& e) {
    refuse(arg, fmt::format("cannot be exported through DLPack: {}", e.what()));
  }
  auto* m = static_cast<dl_managed_tensor*>(PyCapsule_GetPointer(v.capsule_.ptr(), capsule_name));
  if (m == nullptr) throw py::error_already_set();
  const dl_tensor& t = m->tensor;
  v.shape_.assign(t.shape, t.shape + t.ndim);
  v.type_ = from_dl(t.dtype);
  if (t.device.type == 2 || t.device.type == 13)
    v.device_ = {true, t.device.id};
  else if (t.device.type != 1 && t.device.type != 3)
    refuse(arg, fmt::format("lives on DLPack device type {}; eplb takes host and CUDA memory", t.device.type));
  if (!row_major(v.shape_, t.strides, 1)) refuse(arg, "is not contiguous (call .contiguous() first)");
  v.data_ = static_cast<std::byte*>(t.data) + t.byte_offset;
  v.bytes_ = static_cast<std::size_t>(v.numel()) * static_cast<std::size_t>((v.type_.bits + 7) / 8);
  return v;
}

namespace {
struct export_ctx {
  std::vector<std::int64_t> shape;
  PyObject* owner;  // a strong reference, dropped by the deleter
};

void delete_export(dl_managed_tensor* m) {
  auto* ctx = static_cast<export_ctx*>(m->manager_ctx);
  {
    py::gil_scoped_acquire gil;  // consumers may free the tensor from any thread
    Py_XDECREF(ctx->owner);
  }
  delete ctx;
  delete m;
}
}  // namespace

py::capsule export_dlpack(void* data, std::vector<std::int64_t> shape, dtype type, int ordinal, py::object owner) {
  auto* ctx = new export_ctx{std::move(shape), owner.release().ptr()};
  auto* m = new dl_managed_tensor{};
  m->tensor.data = data;
  m->tensor.device = ordinal < 0 ? dl_device{1, 0} : dl_device{2, ordinal};
  m->tensor.ndim = static_cast<std::int32_t>(ctx->shape.size());
  m->tensor.dtype = {static_cast<std::uint8_t>(type.kind == dtype_kind::float_ ? 2 : 0),
                     static_cast<std::uint8_t>(type.bits), 1};
  m->tensor.shape = ctx->shape.data();
  m->tensor.strides = nullptr;
  m->manager_ctx = ctx;
  m->deleter = delete_export;
  // A capsule no consumer took (still named "dltensor") returns the tensor itself.
  PyObject* cap = PyCapsule_New(m, capsule_name, [](PyObject* self) {
    if (PyCapsule_IsValid(self, capsule_name) == 0) return;  // consumed: renamed "used_dltensor"
    auto* mt = static_cast<dl_managed_tensor*>(PyCapsule_GetPointer(self, capsule_name));
    if (mt != nullptr) mt->deleter(mt);
  });
  if (cap == nullptr) {
    delete_export(m);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(cap);
}

}  // namespace eplb::python

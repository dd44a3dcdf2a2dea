// Tensors from Python without copies: a view of any object that exports the buffer protocol (numpy
// arrays, bytearray, memoryview) or DLPack (torch tensors on CPU or CUDA, numpy >= 1.22, cupy...),
// checked for contiguity, device and dtype with errors naming the argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace eplb::python {

namespace py = pybind11;

enum class dtype_kind { int_, uint, float_, bfloat, complex_, bool_, other };

struct dtype {
  dtype_kind kind = dtype_kind::other;
  int bits = 0;
  friend bool operator==(const dtype&, const dtype&) = default;
};
[[nodiscard]] std::string to_string(dtype t);

/// Where a tensor's memory lives: ordinal -1 for host memory, else the CUDA device.
struct device_ref {
  bool cuda = false;
  int ordinal = -1;
};

/// A borrowed view of a Python tensor; keeps what exported it alive (the object and, for DLPack,
/// the capsule whose destructor returns the tensor to its producer).
class tensor_view {
 public:
  /// Views `obj`; error(errc::invalid_argument) naming `arg` when it exports neither protocol, is
  /// not C-contiguous, or (writable) is read-only.
  static tensor_view of(const py::handle& obj, std::string_view arg, bool writable);

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }
  [[nodiscard]] std::span<std::byte> span() const noexcept { return {data_, bytes_}; }
  [[nodiscard]] const std::vector<std::int64_t>& shape() const noexcept { return shape_; }
  [[nodiscard]] dtype type() const noexcept { return type_; }
  [[nodiscard]] device_ref device() const noexcept { return device_; }
  [[nodiscard]] std::int64_t numel() const noexcept;

  /// error(errc::invalid_argument) naming `arg` unless the tensor has `ndim` dimensions.
  void require_ndim(std::string_view arg, std::size_t ndim) const;
  /// error(errc::invalid_argument) naming `arg` unless the tensor lives in host memory.
  void require_host(std::string_view arg) const;

 private:
  py::object owner_;    // the exporting object
  py::object capsule_;  // DLPack only
  py::object buffer_;   // buffer protocol only: a memoryview holding the export
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
  std::vector<std::int64_t> shape_;
  dtype type_;
  device_ref device_;
};

/// A DLPack capsule ("dltensor") over memory that `owner` keeps alive: int32 or int64 elements of
/// `shape`, row-major, on the host (ordinal -1) or CUDA device `ordinal`.
[[nodiscard]] py::capsule export_dlpack(void* data, std::vector<std::int64_t> shape, dtype type, int ordinal,
                                        py::object owner);

}  // namespace eplb::python

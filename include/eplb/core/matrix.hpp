// A dense row-major 2-D array: the shape of every per-layer table (maps, loads).
#pragma once

#include <cstddef>
#include <span>
#include <vector>

namespace eplb {

template <typename T>
class matrix {
 public:
  matrix() = default;
  matrix(std::size_t rows, std::size_t cols, T fill = T{}) : rows_(rows), cols_(cols), data_(rows * cols, fill) {}

  [[nodiscard]] std::size_t rows() const noexcept { return rows_; }
  [[nodiscard]] std::size_t cols() const noexcept { return cols_; }
  [[nodiscard]] bool empty() const noexcept { return data_.empty(); }

  [[nodiscard]] std::span<T> row(std::size_t r) noexcept { return {data_.data() + r * cols_, cols_}; }
  [[nodiscard]] std::span<const T> row(std::size_t r) const noexcept { return {data_.data() + r * cols_, cols_}; }
  T& operator()(std::size_t r, std::size_t c) noexcept { return data_[r * cols_ + c]; }
  const T& operator()(std::size_t r, std::size_t c) const noexcept { return data_[r * cols_ + c]; }

  [[nodiscard]] std::span<T> flat() noexcept { return data_; }
  [[nodiscard]] std::span<const T> flat() const noexcept { return data_; }

  friend bool operator==(const matrix&, const matrix&) = default;

 private:
  std::size_t rows_ = 0;
  std::size_t cols_ = 0;
  std::vector<T> data_;
};

}  // namespace eplb

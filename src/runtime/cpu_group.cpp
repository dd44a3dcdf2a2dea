#include "runtime/cpu_group.hpp"

#include <cstring>

#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::runtime {

cpu_group::cpu_group(std::shared_ptr<comm::store> store, int rank, int size, std::chrono::milliseconds timeout)
    : store_(std::move(store)), rank_(rank), size_(size), timeout_(timeout) {
  if (!store_) fail(errc::invalid_argument, "cpu group: a store is required");
}

std::vector<std::string> cpu_group::exchange(const std::string& key, std::string mine,
                                             std::chrono::milliseconds timeout) {
  store_->set(fmt::format("{}/{}", key, rank_), mine);
  std::vector<std::string> all(static_cast<std::size_t>(size_));
  const auto deadline = deadline_after(timeout);
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) {
      all[static_cast<std::size_t>(r)] = std::move(mine);
      continue;
    }
    const auto left =
        std::max(std::chrono::milliseconds(1),
                 std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()));
    try {
      all[static_cast<std::size_t>(r)] = store_->get(fmt::format("{}/{}", key, r), left);
    } catch (const error& e) {
      if (e.code() != errc::timeout) throw;
      fail(errc::timeout, "cpu group rank {}: rank {} did not join {} within {} ms (dead or stalled?)", rank_, r, key,
           timeout.count());
    }
  }
  return all;
}

std::vector<double> cpu_group::allreduce_sum(std::span<const double> values,
                                             std::optional<std::chrono::milliseconds> timeout) {
  std::string mine(values.size_bytes(), '\0');
  std::memcpy(mine.data(), values.data(), values.size_bytes());
  const auto all = exchange(fmt::format("sum/{}", sum_generation_++), std::move(mine), timeout.value_or(timeout_));
  std::vector<double> out(values.size(), 0.0);
  for (int r = 0; r < size_; ++r) {
    const auto& v = all[static_cast<std::size_t>(r)];
    if (v.size() != values.size_bytes()) {
      fail(errc::invalid_argument, "cpu group: rank {} contributed {} bytes to a sum, this rank {}", r, v.size(),
           values.size_bytes());
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
      double x;
      std::memcpy(&x, v.data() + i * sizeof(double), sizeof(double));
      out[i] += x;
    }
  }
  return out;
}

std::int64_t cpu_group::allreduce_min(std::int64_t value, const std::string& round) {
  const auto all = exchange("min/" + round, std::to_string(value), timeout_);
  std::int64_t out = value;
  for (const auto& v : all) out = std::min(out, static_cast<std::int64_t>(std::stoll(v)));
  return out;
}

}  // namespace eplb::runtime

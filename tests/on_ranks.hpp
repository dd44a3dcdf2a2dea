// Running one function per rank on threads (the loopback and in-process tests).
#pragma once

#include <future>
#include <vector>

namespace eplb::testing {

/// Runs fn(rank) for rank 0..size-1 on threads and returns the results in rank order.
template <typename Fn>
auto on_ranks(int size, Fn fn) {
  std::vector<std::future<decltype(fn(0))>> futures;
  for (int r = 0; r < size; ++r) futures.push_back(std::async(std::launch::async, fn, r));
  std::vector<decltype(fn(0))> out;
  for (auto& f : futures) out.push_back(f.get());
  return out;
}

}  // namespace eplb::testing

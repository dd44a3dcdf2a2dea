// Throwing an eplb::error with a formatted message, in one line.
#pragma once

#include <fmt/format.h>

#include <utility>

#include "eplb/error.hpp"

namespace eplb {

template <typename... Args>
[[noreturn]] void fail(errc code, fmt::format_string<Args...> format, Args&&... args) {
  throw error(code, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace eplb

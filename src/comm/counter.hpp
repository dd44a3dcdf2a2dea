// The integer a store counter holds (an absent value counts as 0); anything else is an error naming
// the key, not a std::invalid_argument from deep inside a store.
#pragma once

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>

#include "util/fail.hpp"

namespace eplb::comm {

inline std::int64_t parse_counter(std::string_view text, const std::string& key) {
  if (text.empty()) return 0;
  std::int64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size()) {
    fail(errc::invalid_argument, "store: key \"{}\" holds \"{}\", not an integer counter", key, text.substr(0, 40));
  }
  return v;
}

}  // namespace eplb::comm

// libFuzzer target: config JSON. Any bytes must give a valid config or an eplb::error.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "eplb/config.hpp"
#include "eplb/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto c = eplb::config::from_json({reinterpret_cast<const char*>(data), size});
    c.validate();  // what from_json accepted must stay valid
    if (c.window_size <= 0 || c.step_interval <= 0) std::abort();
  } catch (const eplb::error&) {
  }
  return 0;
}

// libFuzzer target: `eplb plan` input. Any bytes must give a plan or an eplb::error, never a crash.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "eplb/error.hpp"
#include "tools/plan_json.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto request = eplb::tools::parse_plan_text({reinterpret_cast<const char*>(data), size});
    // Keep each input fast: the policy is linear in layers x replicas.
    if (request.load.rows() * static_cast<std::size_t>(request.num_replicas) > 200'000) return 0;
    (void)eplb::tools::to_json(eplb::tools::run_plan(request));
  } catch (const eplb::error&) {
  }
  return 0;
}

// The versions of eplb and of what it runs on here, for bug reports and `eplb info --json`.
#pragma once

#include <string>
#include <vector>

#include "eplb/export.hpp"

namespace eplb {

struct component_version {
  std::string name;     ///< "eplb", "cuda driver", "cuda runtime", "nccl", "gloo"
  std::string version;  ///< "2.28.3"; empty when the component is not built or not present here
  std::string note;     ///< where the number comes from, or why there is none
};

/// eplb's own version first, then every component eplb can use; never throws.
[[nodiscard]] EPLB_API std::vector<component_version> component_versions() noexcept;

}  // namespace eplb

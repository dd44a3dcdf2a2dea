#include "eplb/error.hpp"

namespace eplb {

std::string_view to_string(errc code) noexcept {
  switch (code) {
    case errc::invalid_argument:
      return "invalid_argument";
    case errc::invalid_map:
      return "invalid_map";
    case errc::invalid_config:
      return "invalid_config";
    case errc::invalid_json:
      return "invalid_json";
    case errc::backend_unavailable:
      return "backend_unavailable";
    case errc::timeout:
      return "timeout";
    case errc::peer_failure:
      return "peer_failure";
    case errc::transport:
      return "transport";
    case errc::device:
      return "device";
    case errc::verification_failed:
      return "verification_failed";
    case errc::cancelled:
      return "cancelled";
    case errc::out_of_memory:
      return "out_of_memory";
    case errc::internal:
      return "internal";
  }
  return "unknown";
}

}  // namespace eplb

// The one error vocabulary of eplb: every failure is an eplb::error carrying an errc and a message
// that names what was wrong (field, value, rank, layer...).
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

#include "eplb/export.hpp"

namespace eplb {

enum class errc {
  invalid_argument,     ///< a function argument or CLI flag is out of its domain
  invalid_map,          ///< a placement map breaks a rule (ids, shapes, replicas)
  invalid_config,       ///< a config field has a value that is not allowed
  invalid_json,         ///< input is not JSON or not of the expected shape
  backend_unavailable,  ///< a backend was not built or cannot run on this machine
  timeout,              ///< a wait ran past its deadline
  peer_failure,         ///< a peer died, went silent or reported an error
  transport,            ///< the transport failed (socket, NCCL, Gloo)
  device,               ///< the device failed (CUDA error, injected device fault)
  verification_failed,  ///< bytes after a move differ from the reference
  cancelled,            ///< the operation was cancelled (stop())
  out_of_memory,        ///< an allocator (the device's, or an engine's allocator hook) had no memory
  internal,             ///< a broken invariant inside eplb
};

[[nodiscard]] EPLB_API std::string_view to_string(errc code) noexcept;

class EPLB_API error : public std::runtime_error {
 public:
  error(errc code, const std::string& message) : std::runtime_error(message), code_(code) {}
  [[nodiscard]] errc code() const noexcept { return code_; }

 private:
  errc code_;
};

}  // namespace eplb

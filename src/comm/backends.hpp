// Constructors of the individual transports, called only by the registry (src/registry.cpp), which
// wraps each in the communicator a caller uses.
#pragma once

#include <string>

#include "comm/transport.hpp"

namespace eplb::comm {

std::unique_ptr<transport> make_loopback(const setup& s);
std::unique_ptr<transport> make_gloo(const setup& s);
std::unique_ptr<transport> make_nccl(const setup& s, bool stateless);
std::unique_ptr<transport> make_cuda_ipc(const setup& s);
/// gloo's shared-memory transport: cuda_ipc's machinery with the mailbox in pinned host memory.
std::unique_ptr<transport> make_shared_memory_gloo(const setup& s);

/// Whether gloo runs over shared memory here (src/comm/gloo_transport.cpp). Every rank calls it at
/// start, also where it cannot say yes, since the choice is a rendezvous of all ranks.
bool gloo_over_shared_memory(const setup& s);

/// The loaded NCCL's encoded version (ncclGetVersion), 0 when it cannot say (src/comm/nccl.cpp).
int nccl_runtime_version() noexcept;
/// Why NCCL cannot be loaded here, or empty when it can (src/comm/nccl_library.cpp).
std::string nccl_unavailable_reason() noexcept;

}  // namespace eplb::comm

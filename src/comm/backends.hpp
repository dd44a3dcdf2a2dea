// Constructors of the individual backends, called only by the registry (src/comm/registry.cpp).
#pragma once

#include "eplb/comm/communicator.hpp"

namespace eplb::comm {

std::unique_ptr<communicator> make_loopback(const setup& s);
std::unique_ptr<communicator> make_gloo(const setup& s);
std::unique_ptr<communicator> make_nccl(const setup& s, bool stateless);
std::unique_ptr<communicator> make_cuda_ipc(const setup& s);
/// gloo's shared-memory transport: cuda_ipc's machinery with the mailbox in pinned host memory.
std::unique_ptr<communicator> make_shared_memory_gloo(const setup& s);

}  // namespace eplb::comm

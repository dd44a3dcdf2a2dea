// A store whose waits observe a stop token (issue 17): get() waits in slices of wait_slice and ends
// with errc::cancelled once a stop is requested, and every other operation but erase() refuses
// then, so that a communicator being made when the state stops (Gloo's rendezvous reads its peers'
// addresses and meets them through it) gives up at once instead of after the timeout.
#pragma once

#include <memory>
#include <stop_token>

#include "eplb/comm/store.hpp"

namespace eplb::runtime {

[[nodiscard]] std::shared_ptr<comm::store> make_stoppable_store(std::shared_ptr<comm::store> inner,
                                                                std::stop_token stop);

}  // namespace eplb::runtime

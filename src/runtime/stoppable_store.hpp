// A store whose waits observe a stop token (issue 17): get() waits in slices of wait_slice and ends
// with errc::cancelled once a stop is requested, so that a communicator being made when the state
// stops (Gloo's rendezvous reads its peers' addresses through it) gives up at once instead of
// after the timeout. Everything else goes straight to the inner store.
#pragma once

#include <memory>
#include <stop_token>

#include "eplb/comm/store.hpp"

namespace eplb::runtime {

[[nodiscard]] std::shared_ptr<comm::store> make_stoppable_store(std::shared_ptr<comm::store> inner,
                                                                std::stop_token stop);

}  // namespace eplb::runtime

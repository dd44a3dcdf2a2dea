// Every rule an eplb_state's parameters must meet before anything is made, in one place: the
// config's own fields, the model, how config and model fit together (staging caps that must hold
// one layer, communicators that cannot span nodes), the weights, and the policy's parameters.
#pragma once

#include "eplb/state.hpp"

namespace eplb::state_detail {

/// Throws eplb::error (invalid_config naming the config field, or invalid_argument) at the first
/// rule `p` breaks.
void validate(const state_params& p);

/// The rules on the communicator itself (handed in, or made by a factory): its kind matches the
/// config unless that says "auto", and async mode needs one that is safe from a background thread.
void check_communicator(const config& cfg, const comm::communicator& c);

}  // namespace eplb::state_detail

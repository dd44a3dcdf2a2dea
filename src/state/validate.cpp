#include "state/validate.hpp"

#include "eplb/core/policy.hpp"
#include "state/engine_buffers.hpp"
#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {

void check_handles(const state_params& p) {
  if (p.dev == nullptr || p.serving_stream == nullptr) {
    fail(errc::invalid_argument, "eplb_state: dev and serving_stream are required");
  }
  if (!p.store) fail(errc::invalid_argument, "eplb_state: store is required (CPU collectives)");
  if (p.rank < 0 || p.rank >= p.model.shape.num_ranks) {
    fail(errc::invalid_argument, "eplb_state: rank {} is out of range for {} ranks", p.rank, p.model.shape.num_ranks);
  }
  if (p.comm_wrap && (p.comm_factory || p.comm)) {
    fail(errc::invalid_argument,
         "eplb_state: comm_wrap wraps the communicators eplb makes itself; with {} it would never be used",
         p.comm_factory ? "comm_factory" : "a communicator handed in");
  }
}

void check_weights(const state_params& p) {
  const auto& shape = p.model.shape;
  if (p.weights.base.size() != static_cast<std::size_t>(shape.layers)) {
    fail(errc::invalid_argument, "eplb_state: weights describe {} layers, the model has {}", p.weights.base.size(),
         shape.layers);
  }
  for (std::size_t l = 0; l < p.weights.base.size(); ++l) {
    const auto& layer = p.weights.base[l];
    if (layer.size() != shape.bundle.size()) {
      fail(errc::invalid_argument, "eplb_state: weights give {} tensors for a layer, the bundle has {}", layer.size(),
           shape.bundle.size());
    }
    for (std::size_t t = 0; t < layer.size(); ++t) {
      if (layer[t] == nullptr) {
        fail(errc::invalid_argument, "eplb_state: weights[{}][{}] ({}) is null", l, t, shape.bundle[t].name);
      }
    }
  }
}

// How the config fits the model: the redundant slots, the staging caps that must hold one layer of
// this rank's slots (rearranger::layer_area_bytes()), and a communicator that cannot span nodes.
void check_config_against_model(const state_params& p) {
  const auto& cfg = p.cfg;
  const auto& shape = p.model.shape;
  if (shape.num_physical != shape.num_logical + cfg.num_redundant_experts) {
    fail(errc::invalid_config, "num_redundant_experts: {} does not match the model ({} slots for {} experts)",
         cfg.num_redundant_experts, shape.num_physical, shape.num_logical);
  }
  const std::size_t area = shape.expert_bytes() * static_cast<std::size_t>(shape.slots_per_rank());
  const bool capped_below_layer = cfg.staging_bytes != 0 && cfg.staging_bytes < area;
  if (cfg.register_buffers && !cfg.use_async && capped_below_layer) {
    fail(errc::invalid_config,
         "register_buffers: true is not allowed with staging_bytes = {} (registered transfers need one layer of "
         "this rank in one piece: {} bytes)",
         cfg.staging_bytes, area);
  }
  if (cfg.use_async && capped_below_layer) {
    fail(errc::invalid_config, "staging_bytes: {} is not allowed in async mode (one layer of this rank needs {} bytes)",
         cfg.staging_bytes, area);
  }
  if (cfg.resolved_communicator() == comm::backend::cuda_ipc && p.model.num_nodes > 1) {
    fail(errc::invalid_config,
         "communicator: cuda_ipc connects the GPUs of one node, the model spans {} nodes (use gloo or nccl)",
         p.model.num_nodes);
  }
}

// The policy's parameters (groups, nodes) now, not at the first rebalance.
void check_policy_params(const state_params& p) {
  const auto& shape = p.model.shape;
  const matrix<double> no_load(static_cast<std::size_t>(shape.layers), static_cast<std::size_t>(shape.num_logical));
  try {
    eplb::validate(
        rebalance_input{no_load, shape.num_physical, p.model.num_groups, p.model.num_nodes, shape.num_ranks});
  } catch (const error& e) {
    fail(e.code(), "eplb_state: model: {}", e.what());
  }
}

// Elastic EP: a joining rank (state_params::join_epoch) takes its maps from the set it joins.
void check_join(const state_params& p) {
  if (p.join_epoch < 0) fail(errc::invalid_argument, "eplb_state: join_epoch: {} is not allowed (>= 0)", p.join_epoch);
  if (p.join_epoch > 0 && p.initial_phy2log) {
    fail(errc::invalid_argument,
         "eplb_state: initial_phy2log: a joining rank (join_epoch {}) takes the maps of the set it joins; leave it "
         "empty",
         p.join_epoch);
  }
}

}  // namespace

void validate(const state_params& p) {
  check_join(p);
  p.cfg.validate();
  p.model.shape.validate();
  check_handles(p);
  check_engine_buffers(p);
  check_config_against_model(p);
  check_weights(p);
  check_policy_params(p);
}

void check_communicator(const config& cfg, const comm::communicator& c) {
  if (c.kind() != cfg.resolved_communicator() && cfg.communicator != "auto") {
    fail(errc::invalid_config, "communicator: config says \"{}\", the communicator given is {}", cfg.communicator,
         comm::to_string(c.kind()));
  }
  if (cfg.use_async && !c.caps().background_safe) {
    fail(errc::invalid_config, "communicator: {} is not safe from a background thread (it launches NCCL kernels)",
         comm::to_string(c.kind()));
  }
}

}  // namespace eplb::state_detail

// `eplb exchange`: a random model whose slots hold recognisable bytes, rounds of random new
// placements, every byte verified after each layer moves. Shared by the command and the tests.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "eplb/comm/communicator.hpp"
#include "eplb/core/matrix.hpp"
#include "eplb/core/placement.hpp"
#include "eplb/device/device.hpp"
#include "eplb/exec/rearrange.hpp"

namespace eplb::tools {

struct exchange_config {
  int ranks = 2;
  int layers = 2;
  int experts = 8;
  int redundant = 2;
  std::vector<std::size_t> tensor_bytes{4096, 1024};
  comm::backend backend = comm::backend::loopback;
  device::backend_kind device = device::backend_kind::host;
  std::uint64_t seed = 1;
  int rounds = 4;
  std::size_t staging_bytes = 0;
  bool coalesce = true;           ///< one message per peer where a layer fits (rearrange_options::coalesce)
  bool register_buffers = false;  ///< rearrange_options::register_buffers
  std::chrono::milliseconds timeout{30'000};
  device::host_faults faults;  ///< host device only
  int fault_rank = -1;         ///< the rank whose device gets `faults` (-1: every rank)
};

/// Validates the config; error(errc::invalid_argument) naming the flag.
void validate(const exchange_config& cfg);

struct exchange_result {
  bool verified = false;
  int rounds = 0;
  std::uint64_t bytes_moved = 0;  ///< bytes this rank received (summed over ranks by the caller)
  double seconds = 0.0;
  std::string failure;  ///< empty when everything verified
};

/// The placement of round `round` (0 = the initial one). Identical on every rank for the same seed:
/// random maps with replicas and empty slots, permutations within ranks, full reshuffles, no-ops.
[[nodiscard]] matrix<expert_id> round_placement(const exchange_config& cfg, int round, const matrix<expert_id>& prev);

/// The recognisable byte at `offset` of `tensor` of `expert` in `layer`.
[[nodiscard]] std::byte weight_byte(int layer, expert_id expert, int tensor, std::size_t offset) noexcept;

/// One rank's live weights filled with weight_byte() for a placement (empty slots get 0xAB), and
/// the reference checksums verification compares against. `dev` and `stream` must outlive it.
class pattern_model {
 public:
  pattern_model(exec::model_shape shape, int rank, device::device& dev, device::stream& stream,
                const matrix<expert_id>& placement_map, std::chrono::milliseconds timeout);
  [[nodiscard]] const exec::rank_weights& weights() const noexcept { return weights_; }
  [[nodiscard]] const exec::model_shape& shape() const noexcept { return shape_; }
  [[nodiscard]] exec::checksum_fn reference() const;
  /// Every byte of this rank's slots of `layer` (tensor by tensor, slot by slot), for comparisons.
  [[nodiscard]] std::vector<std::byte> snapshot(int layer);
  /// The first of rank `rank`'s slots of `layer` whose bytes are not those of the expert `row` (the
  /// layer's phy2log over all ranks) puts there, as a line naming it; "" when every slot holds its
  /// expert's bytes (empty slots are skipped).
  [[nodiscard]] std::string mismatch(int layer, std::span<const expert_id> row, int rank);
  /// Writes `expert`'s bytes of `layer` into local slot `local_slot`, as an engine loads an expert
  /// from its checkpoint (eplb_state::recover's reload_expert); done when it returns.
  void load_expert(int layer, expert_id expert, int local_slot);

 private:
  void fill(int rank, const matrix<expert_id>& placement_map, std::span<std::byte> host);
  [[nodiscard]] std::size_t largest_tensor() const noexcept;

  exec::model_shape shape_;
  device::device& dev_;
  device::stream& stream_;
  std::chrono::milliseconds timeout_;
  std::vector<device::stream_buffer> storage_;  // freed after the stream's queued work, even after a timeout
  device::stream_buffer scratch_;               // snapshot()'s copy of one tensor, reused: verifying allocates nothing
  exec::rank_weights weights_;
  std::map<std::tuple<int, int, int>, std::uint64_t> reference_;
};

/// The bundle exchange runs use: tensors of the given sizes with odd strides, in `memory`.
[[nodiscard]] exec::model_shape pattern_shape(const exchange_config& cfg);

/// One rank's whole run on an existing communicator.
[[nodiscard]] exchange_result run_exchange_rank(const exchange_config& cfg, int rank, comm::communicator& c,
                                                device::device& dev);

/// Runs every rank: threads for loopback, processes of `self_exe` for other backends.
[[nodiscard]] exchange_result run_exchange(const exchange_config& cfg, const std::string& self_exe,
                                           const std::vector<std::string>& child_args);

}  // namespace eplb::tools

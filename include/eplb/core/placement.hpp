// Placement of logical experts on physical slots, for every MoE layer.
//
// R physical slots per layer are spread evenly over the EP ranks: slot p lives on rank
// p / (R / ranks). phy2log[layer][p] is the logical expert in slot p, or empty_slot (-1).
// log2phy and replica counts are derived and kept in step with phy2log.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "eplb/core/matrix.hpp"
#include "eplb/export.hpp"

namespace eplb {

using expert_id = std::int32_t;
inline constexpr expert_id empty_slot = -1;

/// The most entries a log2phy table (layers x logical experts x the most replicas of one expert, padded
/// with -1) may have: 64 MiB as int32. Placements are refused above it (a ~400 KB map could
/// otherwise ask for gigabytes), and the policies refuse shapes whose worst case is above it
/// (check_limits in policy.hpp).
inline constexpr std::int64_t max_log2phy_entries = std::int64_t{1} << 24;

class EPLB_API placement {
 public:
  /// Validates phy2log (layers x R) against num_logical and num_ranks and derives the other maps.
  /// Throws error(errc::invalid_map) naming `field`, the layer/slot and the broken rule: ids out of
  /// range, a logical expert without a replica (unless `allow_masked`), R not divisible by
  /// num_ranks, an empty shape. `allow_masked`: an expert may have no replica (masked: its bytes
  /// were lost with a rank; replica_count 0, log2phy all -1, no token may be routed to it); the
  /// rule holds for set_layer() too.
  placement(matrix<expert_id> phy2log, int num_logical, int num_ranks, std::string_view field = "phy2log",
            bool allow_masked = false);

  /// Builds from possibly ragged rows (parsed input); a row of the wrong length is an error.
  static placement from_rows(const std::vector<std::vector<std::int64_t>>& rows, int num_logical, int num_ranks,
                             std::string_view field = "phy2log");

  /// vLLM's initial map: slot p holds expert p % num_logical.
  static placement initial(int layers, int num_logical, int num_physical, int num_ranks);

  [[nodiscard]] int layers() const noexcept { return static_cast<int>(phy2log_.rows()); }
  [[nodiscard]] int num_logical() const noexcept { return num_logical_; }
  [[nodiscard]] int num_physical() const noexcept { return static_cast<int>(phy2log_.cols()); }
  [[nodiscard]] int num_ranks() const noexcept { return num_ranks_; }
  [[nodiscard]] int slots_per_rank() const noexcept { return num_physical() / num_ranks_; }
  [[nodiscard]] int rank_of_slot(int slot) const noexcept { return slot / slots_per_rank(); }

  [[nodiscard]] const matrix<expert_id>& phy2log() const noexcept { return phy2log_; }
  [[nodiscard]] std::span<const expert_id> phy2log(int layer) const noexcept { return phy2log_.row(layer); }
  /// Slots holding `logical` in `layer`, ascending, padded with -1 to max_replicas().
  [[nodiscard]] std::span<const std::int32_t> log2phy(int layer, int logical) const noexcept;
  [[nodiscard]] int replica_count(int layer, int logical) const noexcept { return replica_count_(layer, logical); }
  [[nodiscard]] const matrix<std::int32_t>& replica_counts() const noexcept { return replica_count_; }
  /// Width of the log2phy table: the largest replica count over all layers.
  [[nodiscard]] int max_replicas() const noexcept { return max_replicas_; }
  [[nodiscard]] bool allows_masked() const noexcept { return allow_masked_; }
  /// (layer, expert) pairs without a replica, layer by layer in expert order: masked experts.
  [[nodiscard]] std::vector<std::pair<int, int>> masked() const;

  /// Replaces one layer's row (validated like the constructor) and re-derives its maps.
  void set_layer(int layer, std::span<const expert_id> row);

  friend bool operator==(const placement& a, const placement& b) { return a.phy2log_ == b.phy2log_; }

 private:
  void derive();
  void derive_layer(int layer);

  matrix<expert_id> phy2log_;
  int num_logical_ = 0;
  int num_ranks_ = 0;
  int max_replicas_ = 0;
  bool allow_masked_ = false;
  matrix<std::int32_t> replica_count_;
  std::vector<std::int32_t> log2phy_;  // layers x num_logical x max_replicas
};

/// Checks one layer's row; throws error(errc::invalid_map) naming field[layer][slot]. `allow_masked`:
/// an expert without a replica is no error.
EPLB_API void validate_phy2log_row(std::span<const expert_id> row, int num_logical, int layer, std::string_view field,
                                   bool allow_masked = false);

/// Slots whose expert differs between two placements of the same shape.
[[nodiscard]] EPLB_API std::int64_t moved_slots(const matrix<expert_id>& before, const matrix<expert_id>& after);

}  // namespace eplb

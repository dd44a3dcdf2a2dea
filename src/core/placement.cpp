#include "eplb/core/placement.hpp"

#include <algorithm>

#include "util/fail.hpp"

namespace eplb {

namespace {

// log2phy is padded to the most replicas of any expert in any layer: a small map whose one expert
// fills a long row would ask for gigabytes, so the table's size is checked before it is allocated.
void check_log2phy_size(std::size_t layers, int num_logical, int widest, std::string_view field) {
  const auto entries = static_cast<std::int64_t>(layers) * num_logical * widest;
  if (entries > max_log2phy_entries) {
    fail(errc::invalid_map,
         "{}: log2phy for {} layers x {} experts x {} replicas (the most of one expert) has {} entries, over the "
         "limit of {} (eplb::max_log2phy_entries)",
         field, layers, num_logical, widest, entries, max_log2phy_entries);
  }
}

int widest_row(std::span<const expert_id> row, std::vector<int>& count) {
  std::fill(count.begin(), count.end(), 0);
  int widest = 0;
  for (expert_id e : row) {
    if (e >= 0) widest = std::max(widest, ++count[static_cast<std::size_t>(e)]);
  }
  return widest;
}

}  // namespace

void validate_phy2log_row(std::span<const expert_id> row, int num_logical, int layer, std::string_view field,
                          bool allow_masked) {
  thread_local std::vector<unsigned char> seen;
  seen.assign(static_cast<std::size_t>(num_logical), 0);
  for (std::size_t p = 0; p < row.size(); ++p) {
    const expert_id e = row[p];
    if (e < empty_slot || e >= num_logical) {
      fail(errc::invalid_map, "{}[{}][{}]: expert id {} is out of range (allowed -1 for an empty slot, or 0..{})",
           field, layer, p, e, num_logical - 1);
    }
    if (e >= 0) seen[static_cast<std::size_t>(e)] = 1;
  }
  if (allow_masked) return;
  for (int e = 0; e < num_logical; ++e) {
    if (!seen[static_cast<std::size_t>(e)]) {
      fail(errc::invalid_map, "{}[{}]: logical expert {} has no replica (every expert needs at least one slot)", field,
           layer, e);
    }
  }
}

placement::placement(matrix<expert_id> phy2log, int num_logical, int num_ranks, std::string_view field,
                     bool allow_masked)
    : phy2log_(std::move(phy2log)), num_logical_(num_logical), num_ranks_(num_ranks), allow_masked_(allow_masked) {
  if (num_logical <= 0)
    fail(errc::invalid_map, "{}: number of logical experts must be > 0, got {}", field, num_logical);
  if (num_ranks <= 0) fail(errc::invalid_map, "{}: number of ranks must be > 0, got {}", field, num_ranks);
  if (phy2log_.rows() == 0) fail(errc::invalid_map, "{}: needs at least one layer", field);
  const auto r = static_cast<int>(phy2log_.cols());
  if (r == 0) fail(errc::invalid_map, "{}: needs at least one physical slot per layer", field);
  if (r % num_ranks != 0) {
    fail(errc::invalid_map, "{}: {} physical slots per layer are not divisible by {} ranks", field, r, num_ranks);
  }
  if (r < num_logical) {
    fail(errc::invalid_map, "{}: {} physical slots cannot hold {} logical experts", field, r, num_logical);
  }
  int widest = 0;
  std::vector<int> count(static_cast<std::size_t>(num_logical));
  for (int l = 0; l < layers(); ++l) {
    validate_phy2log_row(phy2log_.row(l), num_logical, l, field, allow_masked);
    widest = std::max(widest, widest_row(phy2log_.row(l), count));
  }
  check_log2phy_size(phy2log_.rows(), num_logical, widest, field);
  derive();
}

placement placement::from_rows(const std::vector<std::vector<std::int64_t>>& rows, int num_logical, int num_ranks,
                               std::string_view field) {
  if (rows.empty()) fail(errc::invalid_map, "{}: needs at least one layer", field);
  const std::size_t width = rows.front().size();
  matrix<expert_id> m(rows.size(), width);
  for (std::size_t l = 0; l < rows.size(); ++l) {
    if (rows[l].size() != width) {
      fail(errc::invalid_map, "{}[{}]: row has {} entries, row 0 has {} (rows must all be the same length)", field, l,
           rows[l].size(), width);
    }
    for (std::size_t p = 0; p < width; ++p) {
      const std::int64_t v = rows[l][p];
      if (v < empty_slot || v >= num_logical) {
        fail(errc::invalid_map, "{}[{}][{}]: expert id {} is out of range (allowed -1 for an empty slot, or 0..{})",
             field, l, p, v, num_logical - 1);
      }
      m(l, p) = static_cast<expert_id>(v);
    }
  }
  return placement(std::move(m), num_logical, num_ranks, field);
}

placement placement::initial(int layers, int num_logical, int num_physical, int num_ranks) {
  if (layers <= 0) fail(errc::invalid_map, "initial placement: layers must be > 0, got {}", layers);
  if (num_logical <= 0) fail(errc::invalid_map, "initial placement: experts must be > 0, got {}", num_logical);
  matrix<expert_id> m(static_cast<std::size_t>(layers), static_cast<std::size_t>(std::max(num_physical, 0)));
  for (int l = 0; l < layers; ++l) {
    for (int p = 0; p < num_physical; ++p) m(l, p) = p % num_logical;
  }
  return placement(std::move(m), num_logical, num_ranks, "initial placement");
}

std::span<const std::int32_t> placement::log2phy(int layer, int logical) const noexcept {
  const auto w = static_cast<std::size_t>(max_replicas_);
  return {log2phy_.data() + (static_cast<std::size_t>(layer) * num_logical_ + logical) * w, w};
}

void placement::derive() {
  replica_count_ = matrix<std::int32_t>(phy2log_.rows(), static_cast<std::size_t>(num_logical_), 0);
  int widest = 0;
  for (int l = 0; l < layers(); ++l) {
    for (expert_id e : phy2log_.row(l)) {
      if (e >= 0) widest = std::max(widest, ++replica_count_(l, e));
    }
  }
  max_replicas_ = widest;
  log2phy_.assign(phy2log_.rows() * num_logical_ * static_cast<std::size_t>(max_replicas_), -1);
  for (int l = 0; l < layers(); ++l) derive_layer(l);
}

void placement::derive_layer(int layer) {
  const auto w = static_cast<std::size_t>(max_replicas_);
  auto* base = log2phy_.data() + static_cast<std::size_t>(layer) * num_logical_ * w;
  std::fill(base, base + num_logical_ * w, -1);
  auto counts = replica_count_.row(layer);
  std::fill(counts.begin(), counts.end(), 0);
  const auto row = phy2log_.row(layer);
  for (std::size_t p = 0; p < row.size(); ++p) {
    const expert_id e = row[p];
    if (e < 0) continue;
    base[static_cast<std::size_t>(e) * w + static_cast<std::size_t>(counts[e]++)] = static_cast<std::int32_t>(p);
  }
}

void placement::set_layer(int layer, std::span<const expert_id> row) {
  if (layer < 0 || layer >= layers()) {
    fail(errc::invalid_argument, "set_layer: layer {} out of range 0..{}", layer, layers() - 1);
  }
  if (row.size() != phy2log_.cols()) {
    fail(errc::invalid_map, "phy2log[{}]: row has {} entries, expected {}", layer, row.size(), phy2log_.cols());
  }
  validate_phy2log_row(row, num_logical_, layer, "phy2log", allow_masked_);
  std::vector<int> count(static_cast<std::size_t>(num_logical_));
  const int widest = widest_row(row, count);
  if (widest > max_replicas_) check_log2phy_size(phy2log_.rows(), num_logical_, widest, "phy2log");
  std::copy(row.begin(), row.end(), phy2log_.row(layer).begin());
  if (widest > max_replicas_) {
    derive();  // the log2phy table must widen: rebuild it for every layer
  } else {
    derive_layer(layer);
  }
}

std::vector<std::pair<int, int>> placement::masked() const {
  std::vector<std::pair<int, int>> out;
  if (!allow_masked_) return out;
  for (int l = 0; l < layers(); ++l) {
    for (int e = 0; e < num_logical_; ++e) {
      if (replica_count_(l, e) == 0) out.emplace_back(l, e);
    }
  }
  return out;
}

std::int64_t moved_slots(const matrix<expert_id>& before, const matrix<expert_id>& after) {
  if (before.rows() != after.rows() || before.cols() != after.cols()) {
    fail(errc::invalid_map, "moved_slots: shapes differ ({}x{} vs {}x{})", before.rows(), before.cols(), after.rows(),
         after.cols());
  }
  std::int64_t n = 0;
  for (std::size_t i = 0; i < before.flat().size(); ++i) n += before.flat()[i] != after.flat()[i];
  return n;
}

}  // namespace eplb

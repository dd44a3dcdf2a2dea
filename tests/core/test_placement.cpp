#include <doctest/doctest.h>

#include "check_error.hpp"
#include "eplb/core/load.hpp"
#include "eplb/core/placement.hpp"

using namespace eplb;

namespace {
matrix<expert_id> rows_to_matrix(std::vector<std::vector<expert_id>> rows) {
  matrix<expert_id> m(rows.size(), rows[0].size());
  for (std::size_t l = 0; l < rows.size(); ++l) {
    for (std::size_t p = 0; p < rows[l].size(); ++p) m(l, p) = rows[l][p];
  }
  return m;
}
}  // namespace

TEST_CASE("placement derives log2phy and replica counts") {
  placement p(rows_to_matrix({{0, 1, 2, 0, -1, 1}}), 3, 2);
  CHECK(p.layers() == 1);
  CHECK(p.num_physical() == 6);
  CHECK(p.slots_per_rank() == 3);
  CHECK(p.rank_of_slot(4) == 1);
  CHECK(p.max_replicas() == 2);
  CHECK(p.replica_count(0, 0) == 2);
  CHECK(p.replica_count(0, 2) == 1);
  const auto s0 = p.log2phy(0, 0);
  CHECK(std::vector<int>(s0.begin(), s0.end()) == std::vector<int>{0, 3});
  const auto s2 = p.log2phy(0, 2);
  CHECK(std::vector<int>(s2.begin(), s2.end()) == std::vector<int>{2, -1});
}

TEST_CASE("initial placement is round robin like vLLM") {
  const auto p = placement::initial(2, 4, 6, 3);
  const auto row = p.phy2log(1);
  CHECK(std::vector<int>(row.begin(), row.end()) == std::vector<int>{0, 1, 2, 3, 0, 1});
}

TEST_CASE("set_layer re-derives maps and widens log2phy when needed") {
  placement p(rows_to_matrix({{0, 1, 2, 3}, {3, 2, 1, 0}}), 4, 2);
  CHECK(p.max_replicas() == 1);
  const std::vector<expert_id> row{0, 0, 1, 2};
  CHECK_EPLB_ERROR(p.set_layer(1, row), errc::invalid_map, "logical expert 3 has no replica");
  CHECK(p.phy2log(1)[0] == 3);  // unchanged after the rejected update
  const std::vector<expert_id> row2{0, 0, 1, -1};
  CHECK_EPLB_ERROR(p.set_layer(1, row2), errc::invalid_map, "phy2log[1]: logical expert 2");
  p = placement(rows_to_matrix({{0, 1, 2, 3, 0, 1}, {3, 2, 1, 0, 0, 1}}), 4, 2);
  const std::vector<expert_id> row3{3, 3, 3, 0, 1, 2};
  p.set_layer(0, row3);
  CHECK(p.max_replicas() == 3);
  CHECK(p.replica_count(0, 3) == 3);
  CHECK(p.log2phy(1, 0)[1] == 4);  // other layers survive the widening
  CHECK(p.log2phy(1, 0)[2] == -1);
}

TEST_CASE("placement validation names the rule") {
  CHECK_EPLB_ERROR(placement(rows_to_matrix({{0, 1, 5, 2}}), 3, 2), errc::invalid_map,
                   "phy2log[0][2]: expert id 5 is out of range");
  CHECK_EPLB_ERROR(placement(rows_to_matrix({{0, 1, -2, 2}}), 3, 2), errc::invalid_map, "expert id -2");
  CHECK_EPLB_ERROR(placement(rows_to_matrix({{0, 1, 1, 0}}), 3, 2), errc::invalid_map,
                   "logical expert 2 has no replica");
  CHECK_EPLB_ERROR(placement(rows_to_matrix({{0, 1, 2, 0, 1, 2}}), 3, 4), errc::invalid_map,
                   "6 physical slots per layer are not divisible by 4 ranks");
  CHECK_EPLB_ERROR(placement(rows_to_matrix({{0, 1}}), 3, 2), errc::invalid_map, "cannot hold 3 logical experts");
  CHECK_EPLB_ERROR(placement(matrix<expert_id>(), 3, 2), errc::invalid_map, "at least one layer");
  CHECK_EPLB_ERROR(placement(rows_to_matrix({{0}}), 1, 0), errc::invalid_map, "ranks must be > 0");
  CHECK_EPLB_ERROR(placement::from_rows({{0, 1, 2, 0}, {0, 1, 2}}, 3, 2, "old_phy2log"), errc::invalid_map,
                   "old_phy2log[1]: row has 3 entries, row 0 has 4");
  CHECK_EPLB_ERROR(placement::from_rows({{0, 1, 2, 7000000000}}, 3, 2), errc::invalid_map, "7000000000");
}

TEST_CASE("moved_slots counts differing slots") {
  CHECK(moved_slots(rows_to_matrix({{0, 1, 2, 3}}), rows_to_matrix({{0, 2, 1, 3}})) == 2);
  CHECK_EPLB_ERROR(moved_slots(rows_to_matrix({{0, 1}}), rows_to_matrix({{0, 1, 2, 3}})), errc::invalid_map,
                   "shapes differ");
}

TEST_CASE("load window folds a ring of steps to logical load") {
  load_window w(2, 1, 4);
  placement p(rows_to_matrix({{0, 1, 0, 2}}), 3, 2);
  w.record(std::vector<std::int64_t>{1, 2, 3, 4});
  w.record(std::vector<std::int64_t>{10, 20, 30, 40});
  auto logical = w.logical_load(p);
  CHECK(logical(0, 0) == 44.0);
  CHECK(logical(0, 1) == 22.0);
  CHECK(logical(0, 2) == 44.0);
  w.record(std::vector<std::int64_t>{100, 0, 0, 0});  // evicts the first step
  CHECK(w.steps_recorded() == 2);
  CHECK(w.physical_totals()(0, 0) == 110);
  CHECK(w.physical_totals()(0, 3) == 40);
  CHECK_EPLB_ERROR(w.record(std::vector<std::int64_t>{1, 2}), errc::invalid_argument, "expected layers x slots");
  CHECK_EPLB_ERROR(load_window(0, 1, 1), errc::invalid_argument, "window_size must be > 0, got 0");
  w.clear();
  CHECK(w.steps_recorded() == 0);
  CHECK(w.physical_totals()(0, 0) == 0);
}

TEST_CASE("balancedness is mean over max tokens per rank, summed over layers") {
  matrix<double> slots(2, 4);
  // layer 0: ranks get 3 and 7; layer 1: 5 and 5.
  slots(0, 0) = 1;
  slots(0, 1) = 2;
  slots(0, 2) = 3;
  slots(0, 3) = 4;
  slots(1, 0) = 5;
  slots(1, 2) = 5;
  CHECK(balancedness_of_slots(slots, 2) == doctest::Approx((5.0 + 5.0) / (7.0 + 5.0)));
  CHECK(balancedness_of_slots(matrix<double>(1, 4), 2) == 1.0);
  // Replicas split their expert's load evenly.
  placement p(rows_to_matrix({{0, 1, 0, 2}}), 3, 2);
  matrix<double> logical(1, 3);
  logical(0, 0) = 10;
  logical(0, 1) = 2;
  logical(0, 2) = 6;
  // rank 0: 5 + 2 = 7, rank 1: 5 + 6 = 11
  CHECK(balancedness(p, logical) == doctest::Approx(9.0 / 11.0));
}

TEST_CASE("a map whose padded log2phy table would pass max_log2phy_entries is refused") {
  // 300 KB of map, one expert in half the slots: log2phy would be 32,768 x 32,769 entries (4 GiB).
  matrix<expert_id> m(1, 65536, 0);
  for (int e = 0; e < 32768; ++e) m(0, static_cast<std::size_t>(e)) = e;
  CHECK_EPLB_ERROR(placement(m, 32768, 8, "old_phy2log"), errc::invalid_map,
                   "old_phy2log: log2phy for 1 layers x 32768 experts x 32769 replicas (the most of one expert) has "
                   "1073774592 entries, over the limit of 16777216 (eplb::max_log2phy_entries)");
  // Widening through set_layer is checked too, and leaves the placement as it was.
  auto p = placement::initial(1, 4096, 8192, 8);
  std::vector<expert_id> row(8192, 0);
  for (int e = 0; e < 4096; ++e) row[static_cast<std::size_t>(e)] = e;
  CHECK_EPLB_ERROR(p.set_layer(0, row), errc::invalid_map, "eplb::max_log2phy_entries");
  CHECK(p.max_replicas() == 2);
  CHECK(p.phy2log(0)[4096] == 0);
  row[4096] = 1;  // 4,096 x 4,096 entries: at the limit, accepted
  p.set_layer(0, row);
  CHECK(p.max_replicas() == 4096);
}

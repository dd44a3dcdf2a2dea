// libFuzzer target: placement validation and the transfer plan. Bytes become an old and a new map;
// valid pairs must plan on every rank so that every send has exactly one matching receive.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <vector>

#include "eplb/core/placement.hpp"
#include "eplb/error.hpp"
#include "eplb/exec/plan.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 3) return 0;
  const int ranks = 1 + data[0] % 8;
  const int experts = 1 + data[1] % 24;
  const int per_rank = 1 + data[2] % 6;
  const int slots = ranks * per_rank;
  data += 3;
  size -= 3;
  if (size < static_cast<std::size_t>(2 * slots)) return 0;
  eplb::matrix<eplb::expert_id> maps(2, static_cast<std::size_t>(slots));
  for (int i = 0; i < 2 * slots; ++i)
    maps.flat()[static_cast<std::size_t>(i)] = static_cast<eplb::expert_id>(data[i] % (experts + 2)) - 1;
  std::vector<std::vector<std::int64_t>> rows(2);
  for (int l = 0; l < 2; ++l) rows[l].assign(maps.row(l).begin(), maps.row(l).end());
  try {
    const auto p = eplb::placement::from_rows(rows, experts, ranks);
    std::map<std::pair<int, int>, std::vector<int>> sent, received;
    for (int r = 0; r < ranks; ++r) {
      const auto plan = eplb::exec::plan_layer(p.phy2log(0), p.phy2log(1), ranks, r);
      for (const auto& s : plan.sends) sent[{r, s.peer}].push_back(s.expert);
      for (const auto& v : plan.recvs) received[{v.peer, r}].push_back(v.expert);
    }
    if (sent != received) std::abort();  // a send without its receive would hang a real exchange
    (void)eplb::exec::plan_chunks(p.phy2log(0), p.phy2log(1), ranks, experts, 2, 0);
  } catch (const eplb::error&) {
  }
  return 0;
}

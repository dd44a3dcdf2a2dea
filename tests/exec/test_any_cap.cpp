// Issue 17, item 5: every staging cap of at least one expert bundle moves every placement. Random
// old and new placements (several ranks, redundant copies, empty slots, random tensor sizes) are
// moved over loopback ranks (threads) at caps of 1, 2, 3 and 4 bundles, half of them under a commit
// gate (the stop-safe plans of sync mode), and every byte of every slot is compared with the
// reference afterwards; the plans are checked to stay within the cap and
// to be alike on every rank. EPLB_ANY_CAP_SOAK=N multiplies the number of placements (a longer soak).
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdlib>
#include <random>

#include "eplb/error.hpp"
#include "eplb/exec/plan.hpp"
#include "eplb/exec/rearrange.hpp"
#include "on_ranks.hpp"
#include "tools/exchange.hpp"

using namespace eplb;
using eplb::testing::on_ranks;
using namespace std::chrono_literals;

namespace {

int soak() {
  const char* v = std::getenv("EPLB_ANY_CAP_SOAK");
  return v != nullptr && std::atoi(v) > 0 ? std::atoi(v) : 1;
}

// Every expert once, some random copies, some empty slots (when there is room), shuffled.
std::vector<expert_id> random_row(std::mt19937_64& rng, int slots, int experts) {
  std::vector<expert_id> row(static_cast<std::size_t>(slots));
  for (int e = 0; e < experts; ++e) row[static_cast<std::size_t>(e)] = e;
  for (int p = experts; p < slots; ++p) {
    row[static_cast<std::size_t>(p)] = rng() % 5 == 0 ? -1 : static_cast<expert_id>(rng() % experts);
  }
  std::shuffle(row.begin(), row.end(), rng);
  return row;
}

struct trial {
  tools::exchange_config cfg;
  matrix<expert_id> start, target;
  std::size_t cap_rows = 1;
  bool gated = false;  // with a commit gate: the plans that keep every stop safe (sync mode's)
};

trial make_trial(std::mt19937_64& rng, int layers, std::size_t cap_rows) {
  trial t;
  const int ranks = 2 + static_cast<int>(rng() % 4);
  const int per_rank = 2 + static_cast<int>(rng() % 5);
  const int slots = ranks * per_rank;
  const int experts = std::max(1, slots - static_cast<int>(rng() % (slots / 2 + 1)));
  t.cfg = {.ranks = ranks,
           .layers = layers,
           .experts = experts,
           .redundant = slots - experts,
           .tensor_bytes = {1 + rng() % 97, 1 + rng() % 13}};
  t.start = matrix<expert_id>(static_cast<std::size_t>(layers), static_cast<std::size_t>(slots));
  t.target = t.start;
  for (int l = 0; l < layers; ++l) {
    const auto a = random_row(rng, slots, experts);
    const auto b = random_row(rng, slots, experts);
    std::copy(a.begin(), a.end(), t.start.row(static_cast<std::size_t>(l)).begin());
    std::copy(b.begin(), b.end(), t.target.row(static_cast<std::size_t>(l)).begin());
  }
  t.cap_rows = cap_rows;
  return t;
}

struct rank_result {
  std::string error;  // the first problem: an exception, maps not as asked, or a slot with wrong bytes
  std::vector<int> chunks;
};

rank_result run_rank(const trial& t, int rank, const std::shared_ptr<comm::loopback_world>& world) {
  rank_result out;
  auto dev = device::make_host_device();
  auto stream = dev->create_stream();
  auto c = comm::make_communicator(comm::backend::loopback, {.rank = rank, .size = t.cfg.ranks, .world = world});
  placement maps(t.start, t.cfg.experts, t.cfg.ranks);
  tools::pattern_model model(tools::pattern_shape(t.cfg), rank, *dev, *stream, t.start, 10s);
  const std::size_t row_bytes = t.cfg.tensor_bytes[0] + t.cfg.tensor_bytes[1];
  exec::rearrange_options opts{.staging_bytes = t.cap_rows * row_bytes, .timeout = 10s, .verify = model.reference()};
  if (t.gated) {
    // No faults here, so every batch is approved: this runs the stop-safe plans byte for byte.
    opts.commit_gate = [](int, int, const std::exception_ptr& failure) { return failure ? "failed" : ""; };
  }
  exec::rearranger re(model.shape(), rank, *dev, *stream, *c, opts);
  try {
    for (const auto& st : re.rearrange(model.weights(), maps, t.target)) out.chunks.push_back(st.chunks);
  } catch (const eplb::error& e) {
    out.error = fmt::format("rank {}: {}", rank, e.what());
    return out;
  }
  for (int l = 0; l < t.cfg.layers && out.error.empty(); ++l) {
    const auto want = t.target.row(static_cast<std::size_t>(l));
    if (!std::equal(want.begin(), want.end(), maps.phy2log(l).begin())) {
      out.error = fmt::format("rank {} layer {}: maps not as asked", rank, l);
    } else {
      out.error = model.mismatch(l, maps.phy2log(l), rank);  // every byte of every live slot
    }
  }
  return out;
}

// The rows a plan uses on any rank at any time, replayed from its schedule (serial plans), and that
// it ends with every slot holding its new expert.
void check_serial_plan(const exec::chunk_plan& p, std::span<const expert_id> old_row,
                       std::span<const expert_id> new_row, int ranks, std::size_t cap_rows) {
  REQUIRE(p.serial);
  CHECK(static_cast<std::size_t>(p.serial->rows) <= cap_rows);
  const int n = static_cast<int>(p.serial->chunks.size());
  const auto end = exec::serial_stop(*p.serial, old_row, ranks, n);
  REQUIRE(end.has_value());
  CHECK(end->repairs.empty());
  for (std::size_t g = 0; g < new_row.size(); ++g) {
    if (new_row[g] >= 0) CHECK(end->row[g] == new_row[g]);  // a slot left empty is never written
  }
}

}  // namespace

TEST_CASE("every staging cap of at least one bundle moves random placements, every byte verified") {
  std::mt19937_64 rng(1712005);
  const int rounds = 25 * soak();
  int placements = 0, layers_chunked = 0, most_chunks = 0;
  for (int round = 0; round < rounds; ++round) {
    for (std::size_t cap_rows = 1; cap_rows <= 4; ++cap_rows) {
      auto t = make_trial(rng, 24, cap_rows);
      t.gated = round % 2 == 1;
      CAPTURE(round);
      CAPTURE(cap_rows);
      CAPTURE(t.gated);
      CAPTURE(fmt::format("{} ranks, {} experts, {} slots, tensors {}", t.cfg.ranks, t.cfg.experts, t.start.cols(),
                          fmt::join(t.cfg.tensor_bytes, ",")));
      auto world = comm::make_loopback_world(t.cfg.ranks);
      const auto ends = on_ranks(t.cfg.ranks, [&](int r) { return run_rank(t, r, world); });
      for (const auto& e : ends) {
        CHECK_MESSAGE(e.error.empty(), e.error);
        for (std::size_t l = 0; l < e.chunks.size(); ++l) {
          if (e.chunks[l] > 0 && ends[0].chunks[l] > 0) CHECK(e.chunks[l] == ends[0].chunks[l]);  // cut alike
        }
      }
      placements += t.cfg.layers;
      for (const int c : ends[0].chunks) {
        layers_chunked += c > 1 ? 1 : 0;
        most_chunks = std::max(most_chunks, c);
      }
    }
  }
  CHECK(layers_chunked > placements / 4);  // the caps do bite
  MESSAGE(
      fmt::format("{} placements moved, {} in several chunks (at most {})", placements, layers_chunked, most_chunks));
}

TEST_CASE("plans for any cap: within the cap, ending at the new row; stop-safe plans keep every expert") {
  std::mt19937_64 rng(20261217);
  int serial = 0, refused_safe = 0, tried_safe = 0;
  for (int i = 0; i < 3000 * soak(); ++i) {
    const auto t = make_trial(rng, 1, 1 + rng() % 4);
    const auto old_row = t.start.row(0), new_row = t.target.row(0);
    const int ranks = t.cfg.ranks;
    CAPTURE(fmt::format("{}", fmt::join(old_row, ",")));
    CAPTURE(fmt::format("{}", fmt::join(new_row, ",")));
    CAPTURE(ranks);
    CAPTURE(t.cap_rows);
    const auto any = exec::plan_chunks(old_row, new_row, ranks, t.cfg.experts, t.cap_rows, 0, exec::cut_rule::anywhere);
    if (any.serial) {
      ++serial;
      check_serial_plan(any, old_row, new_row, ranks, t.cap_rows);
    }
    ++tried_safe;
    exec::chunk_plan safe;
    try {
      safe = exec::plan_chunks(old_row, new_row, ranks, t.cfg.experts, t.cap_rows, 0);
    } catch (const eplb::error& e) {
      ++refused_safe;  // must not happen: a walk one cycle at a time is always safe
      FAIL_CHECK(e.what());
      continue;
    }
    if (safe.serial) check_serial_plan(safe, old_row, new_row, ranks, t.cap_rows);
    for (int done = 0; done < static_cast<int>(safe.ranges.size()); ++done) {
      const auto stop = exec::stop_after_chunks(old_row, new_row, ranks, t.cfg.experts, safe, done);
      std::vector<char> seen(static_cast<std::size_t>(t.cfg.experts), 0);
      for (const expert_id e : stop.row) {
        if (e >= 0) seen[static_cast<std::size_t>(e)] = 1;
      }
      CHECK(std::all_of(seen.begin(), seen.end(), [](char c) { return c != 0; }));
    }
  }
  CHECK(serial > 100);  // the fallback is exercised
  CHECK(refused_safe == 0);
  MESSAGE(fmt::format("{} serial plans; stop-safe plans refused for {} of {} placements", serial, refused_safe,
                      tried_safe));
}

#include "state/live_set.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <sstream>

#include "comm/host_identity.hpp"
#include "comm/rank_record.hpp"
#include "util/fail.hpp"

namespace eplb::state_detail {

namespace {

using std::chrono::milliseconds;

std::string post_key(const std::string& space, int rank) {
  return fmt::format("{}/alive-{}", space, rank);
}

std::string decision_key(const std::string& space) {
  return space + "/decision";
}

// Short slices, so that a stop request or a decision already made ends the wait early.
constexpr milliseconds slice{20};

std::optional<std::string> get_within(comm::store& store, const std::string& key, milliseconds wait) {
  try {
    return store.get(key, wait);
  } catch (const error& e) {
    if (e.code() != errc::timeout) throw;
    return std::nullopt;
  }
}

// Waits for `rank`'s post until `deadline`; false when it did not come or a decision was made
// (`decided`: then no other post needs waiting for).
bool heard_from(comm::store& store, const std::string& space, int rank, std::chrono::steady_clock::time_point deadline,
                const std::stop_token& stop, const std::function<bool(int)>& gone, bool& decided) {
  for (;;) {
    if (stop.stop_requested()) fail(errc::cancelled, "agreement {}: stopped", space);
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (get_within(store, post_key(space, rank), std::clamp(left, milliseconds(1), slice))) return true;
    if (gone && gone(rank)) return false;  // it cannot post any more
    if (get_within(store, decision_key(space), milliseconds(1))) {
      decided = true;
      return false;
    }
    if (left <= slice) return false;
  }
}

std::string to_text(const arrival& a) {
  std::string out = fmt::format("{} {} {} {}", a.steps, a.rebalances, a.own_slots.rows(), a.own_slots.cols());
  for (std::size_t l = 0; l < a.own_slots.rows(); ++l) {
    for (std::size_t s = 0; s < a.own_slots.cols(); ++s) out += fmt::format(" {}", a.own_slots(l, s));
  }
  return out;
}

arrival from_text(const std::string& text, const std::string& space, int rank) {
  std::istringstream in(text);
  arrival a;
  std::size_t rows = 0, cols = 0;
  in >> a.steps >> a.rebalances >> rows >> cols;
  a.own_slots = matrix<expert_id>(rows, cols, empty_slot);
  for (std::size_t l = 0; l < rows; ++l) {
    for (std::size_t s = 0; s < cols; ++s) in >> a.own_slots(l, s);
  }
  if (!in) fail(errc::transport, "agreement {}: rank {}'s post in the store is malformed", space, rank);
  return a;
}

}  // namespace

arrival arrival_of(std::int64_t steps, std::int64_t rebalances, const matrix<expert_id>& phy2log, int rank,
                   int slots_per_rank) {
  arrival a{steps, rebalances, matrix<expert_id>(phy2log.rows(), static_cast<std::size_t>(slots_per_rank))};
  for (std::size_t l = 0; l < phy2log.rows(); ++l) {
    for (int s = 0; s < slots_per_rank; ++s) {
      a.own_slots(l, static_cast<std::size_t>(s)) = phy2log(l, static_cast<std::size_t>(rank * slots_per_rank + s));
    }
  }
  return a;
}

arrivals agree_arrivals(comm::store& store, const std::string& space, int rank, int size, const arrival& mine,
                        milliseconds timeout, const std::stop_token& stop, bool only_all,
                        const std::function<bool(int)>& gone) {
  store.set(post_key(space, rank), to_text(mine));
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string proposal(static_cast<std::size_t>(size), '0');
  bool decided = false;
  for (int r = 0; r < size; ++r) {
    if (r == rank || (!decided && heard_from(store, space, r, deadline, stop, gone, decided))) {
      proposal[static_cast<std::size_t>(r)] = '1';
    }
  }
  const auto decision = store.set_if_absent(decision_key(space), proposal);
  if (decision.size() != static_cast<std::size_t>(size)) {
    fail(errc::internal, "agreement {}: the decision '{}' is not for {} ranks", space, decision, size);
  }
  arrivals out{.post = std::vector<std::optional<arrival>>(static_cast<std::size_t>(size))};
  for (int r = 0; r < size; ++r) {
    if (decision[static_cast<std::size_t>(r)] == '1') out.ranks.push_back(r);
  }
  if (!out.named(rank) || (only_all && out.ranks.size() != out.post.size())) return out;
  for (int r : out.ranks) {
    // Posted before the decision named it, and kept until every rank named has read it.
    out.post[static_cast<std::size_t>(r)] =
        r == rank ? mine : from_text(store.get(post_key(space, r), timeout), space, r);
  }
  return out;
}

void leave_arrivals(comm::store& store, const std::string& space, int rank) noexcept {
  try {
    store.erase(post_key(space, rank));
  } catch (...) {  // NOLINT(bugprone-empty-catch): a key left behind is a few bytes; the store may be gone
  }
}

matrix<expert_id> owners_view(const arrivals& posted, int slots_per_rank) {
  const auto spr = static_cast<std::size_t>(slots_per_rank);
  const std::size_t layers = posted.post[static_cast<std::size_t>(posted.ranks.front())]->own_slots.rows();
  matrix<expert_id> out(layers, posted.post.size() * spr, empty_slot);
  for (int r : posted.ranks) {
    const auto& theirs = *posted.post[static_cast<std::size_t>(r)];
    if (theirs.own_slots.rows() != layers || theirs.own_slots.cols() != spr) {
      fail(errc::internal, "rank {} posted {} x {} slots, not {} x {}", r, theirs.own_slots.rows(),
           theirs.own_slots.cols(), layers, spr);
    }
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::size_t s = 0; s < spr; ++s) out(l, static_cast<std::size_t>(r) * spr + s) = theirs.own_slots(l, s);
    }
  }
  return out;
}

live_set live_set_of(const arrivals& posted, std::int64_t epoch, int rank, milliseconds timeout) {
  if (!posted.named(rank)) {
    fail(errc::peer_failure,
         "rank {} was left out of the live set of epoch {} (it answered after its peers' timeout of {} ms)", rank,
         epoch, timeout.count());
  }
  live_set live{.ranks = posted.ranks};
  for (int r : posted.ranks) {
    live.last_step = std::max(live.last_step, posted.post[static_cast<std::size_t>(r)]->steps);
    live.last_rebalance = std::max(live.last_rebalance, posted.post[static_cast<std::size_t>(r)]->rebalances);
  }
  return live;
}

namespace {
std::string identity_key(std::int64_t epoch, int rank) {
  return fmt::format("eplb-who-{}/{}", epoch, rank);
}
}  // namespace

void post_identity(comm::store& store, std::int64_t epoch, int rank) {
  store.set(identity_key(epoch, rank), comm::encode(comm::rank_record{comm::this_process(), {}}));
}

void erase_identity(comm::store& store, std::int64_t epoch, int rank) noexcept {
  try {
    store.erase(identity_key(epoch, rank));
  } catch (...) {  // NOLINT(bugprone-empty-catch): a key left behind is a few bytes; the store may be gone
  }
}

std::function<bool(int)> peer_gone(comm::store& store, std::int64_t epoch) {
  return [&store, epoch, me = comm::this_process(),
          known = std::map<int, std::optional<comm::host_identity>>()](int rank) mutable {
    auto it = known.find(rank);
    if (it == known.end()) {
      const auto text = get_within(store, identity_key(epoch, rank), milliseconds(1));
      const auto record = text ? comm::decode_record(*text, 0) : std::nullopt;
      it = known.emplace(rank, record ? std::optional(record->where) : std::nullopt).first;
    }
    const auto& who = it->second;
    // A pid means the same process only in the same PID namespace of the same boot.
    return who && comm::same_host(*who, me) && who->pid_ns == me.pid_ns && !comm::same_process(*who, me) &&
           !comm::process_alive(who->pid);
  };
}

}  // namespace eplb::state_detail

#include "runtime/cpu_group.hpp"

#include <algorithm>
#include <charconv>
#include <cstring>

#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::runtime {

namespace {

// Slice `s` of `n` elements cut into `parts` nearly equal parts: [begin, end).
std::pair<std::size_t, std::size_t> slice(std::size_t n, int parts, int s) {
  const auto p = static_cast<std::size_t>(parts);
  const auto i = static_cast<std::size_t>(s);
  return {n * i / p, n * (i + 1) / p};
}

std::string to_bytes(std::span<const double> values) {
  std::string out(values.size_bytes(), '\0');
  std::memcpy(out.data(), values.data(), values.size_bytes());
  return out;
}

void add_bytes(std::span<double> into, const std::string& bytes) {
  for (std::size_t i = 0; i < into.size(); ++i) {
    double x;
    std::memcpy(&x, bytes.data() + i * sizeof(double), sizeof(double));
    into[i] += x;
  }
}

}  // namespace

std::string stopping_key(int rank) {
  return fmt::format("stopping/{}", rank);
}

// Not add() (the file store locks a counter file: a peer frozen by SIGSTOP while holding that lock
// would block every prober) and not get() (a miss parks a waiter in the TCP store's server):
// set_if_absent answers at once on every store, "0" until the rank announced "1".
bool announced_stop(comm::store& s, int rank) {
  return s.set_if_absent(stopping_key(rank), "0") == "1";
}

cpu_group::cpu_group(std::shared_ptr<comm::store> store, int rank, int size, std::chrono::milliseconds timeout,
                     std::stop_token stop)
    : store_(std::move(store)), rank_(rank), size_(size), timeout_(timeout), stop_(std::move(stop)) {
  if (!store_) fail(errc::invalid_argument, "cpu group: a store is required");
}

namespace {

// The value of `key` if the store has it within `wait`; nothing on a timeout.
std::optional<std::string> get_within(comm::store& s, const std::string& key, std::chrono::milliseconds wait) {
  try {
    return s.get(key, wait);
  } catch (const error& e) {
    if (e.code() != errc::timeout) throw;
    return std::nullopt;
  }
}

}  // namespace

// In slices: between them the stop token (this rank stops) and rank `from`'s announcement (it
// stopped) end the wait early. A key that `from` wrote before announcing is still read.
std::string cpu_group::read(const std::string& key, int from, const std::string& round,
                            std::chrono::steady_clock::time_point deadline, std::chrono::milliseconds timeout) {
  using std::chrono::milliseconds;
  for (;;) {
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (auto v = get_within(*store_, key, std::clamp(left, milliseconds(1), wait_slice))) return std::move(*v);
    if (stop_.stop_requested()) {
      fail(errc::cancelled, "cpu group rank {}: stopped while waiting for rank {} in {}", rank_, from, round);
    }
    if (announced_stop(*store_, from)) {
      if (auto v = get_within(*store_, key, milliseconds(1))) return std::move(*v);
      fail(errc::peer_failure, "cpu group rank {}: rank {} stopped before joining {}", rank_, from, round);
    }
    if (left <= wait_slice) {
      fail(errc::timeout, "cpu group rank {}: rank {} did not join {} within {} ms (dead or stalled?)", rank_, from,
           round, timeout.count());
    }
  }
}

void cpu_group::set_own(const std::string& key, const std::string& value) {
  std::shared_lock lock(post_mutex_);
  if (stopped_) fail(errc::cancelled, "cpu group rank {}: stopped (announced to the peers)", rank_);
  store_->set(key, value);
}

void cpu_group::announce_stop() noexcept {
  {
    std::unique_lock lock(post_mutex_);
    if (stopped_) return;
    stopped_ = true;
  }
  try {
    store_->set(stopping_key(rank_), "1");
  } catch (...) {  // NOLINT(bugprone-empty-catch): peers then find out by their timeout, as for a dead rank
  }
}

// Keys are deleted by their writer one round of the same family later: once this rank has read
// every rank's value of round k, every rank has posted k, so every rank has finished reading
// k - 1 (rounds of a family run in order on each rank). Keys of a round that failed wait for the
// next round that completes. Agreement rounds form one family per rebalance ("min/ID"); a round
// of a later rebalance that completes deletes what is left of the earlier ones (every rank has
// moved on; an earlier rebalance's rounds still running are forgotten ones). So the store holds
// at most a few rounds per family, whatever ran.
void cpu_group::posted(const std::string& family, std::uint64_t order, std::string key) {
  std::lock_guard lock(mutex_);
  auto& f = families_[family];
  // "min/ID" families are ordered by the rebalance id (a retired rebalance's rounds may post after
  // a newer one started); other namespaces have one family.
  f.order = order;
  f.stale.insert(f.stale.end(), std::make_move_iterator(f.current.begin()), std::make_move_iterator(f.current.end()));
  f.current.clear();
  f.current.push_back(std::move(key));
}

void cpu_group::completed(const std::string& family) {
  std::vector<std::string> stale;
  {
    std::lock_guard lock(mutex_);
    const auto space = family.substr(0, family.find('/'));
    const auto mine = families_.find(family);
    const std::uint64_t order = mine == families_.end() ? 0 : mine->second.order;
    for (auto it = families_.begin(); it != families_.end();) {
      auto& f = it->second;
      if (it->first == family) {
        stale.insert(stale.end(), f.stale.begin(), f.stale.end());
        f.stale.clear();
      }
      const bool older = f.order < order && it->first.substr(0, it->first.find('/')) == space;
      if (!older) {
        ++it;
        continue;
      }
      stale.insert(stale.end(), f.stale.begin(), f.stale.end());
      stale.insert(stale.end(), f.current.begin(), f.current.end());
      stale.insert(stale.end(), f.ahead.begin(), f.ahead.end());
      it = families_.erase(it);
    }
  }
  for (const auto& k : stale) store_->erase(k);
}

std::vector<std::string> cpu_group::exchange(const std::string& family, std::uint64_t order, const std::string& round,
                                             std::string mine, std::chrono::milliseconds timeout) {
  const auto own = fmt::format("{}/{}", round, rank_);
  set_own(own, mine);
  posted(family, order, own);
  std::vector<std::string> all(static_cast<std::size_t>(size_));
  const auto deadline = deadline_after(timeout);
  for (int r = 0; r < size_; ++r) {
    all[static_cast<std::size_t>(r)] =
        r == rank_ ? std::move(mine) : read(fmt::format("{}/{}", round, r), r, round, deadline, timeout);
  }
  completed(family);
  return all;
}

// A reduce-scatter then an all-gather through the store: rank s sums slice s of every rank's
// values, then every rank reads the summed slices. Each rank moves about three times its own
// values whatever the number of ranks (an all-gather of whole vectors moves `size` times that
// through the store's server).
std::vector<double> cpu_group::allreduce_sum(std::span<const double> values,
                                             std::optional<std::chrono::milliseconds> timeout_given) {
  const auto timeout = timeout_given.value_or(timeout_);
  const auto round = fmt::format("sum/{}", sum_generation_++);
  const auto deadline = deadline_after(timeout);
  for (int s = 0; s < size_; ++s) {
    if (s == rank_) continue;
    const auto [b, e] = slice(values.size(), size_, s);
    set_own(fmt::format("{}/part/{}/{}", round, s, rank_), to_bytes(values.subspan(b, e - b)));
  }
  const auto [mb, me] = slice(values.size(), size_, rank_);
  std::vector<double> mine(values.begin() + static_cast<std::ptrdiff_t>(mb),
                           values.begin() + static_cast<std::ptrdiff_t>(me));
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    const auto key = fmt::format("{}/part/{}/{}", round, rank_, r);
    const auto part = read(key, r, round, deadline, timeout);
    store_->erase(key);  // this rank is the only reader of a part
    if (part.size() != mine.size() * sizeof(double)) {
      fail(errc::invalid_argument, "cpu group: rank {} contributed {} bytes to slice {} of a sum, this rank {}", r,
           part.size(), rank_, mine.size() * sizeof(double));
    }
    add_bytes(mine, part);
  }
  const auto totals = exchange("sum", 0, round + "/total", to_bytes(mine), timeout);
  std::vector<double> out(values.size(), 0.0);
  for (int s = 0; s < size_; ++s) {
    const auto [b, e] = slice(values.size(), size_, s);
    const auto& t = totals[static_cast<std::size_t>(s)];
    if (t.size() != (e - b) * sizeof(double)) {
      fail(errc::invalid_argument, "cpu group: rank {} contributed {} bytes to a sum, this rank {}", s, t.size(),
           (e - b) * sizeof(double));
    }
    add_bytes(std::span(out).subspan(b, e - b), t);
  }
  return out;
}

// Not through posted(): a queued round of the same family that completes afterwards would count
// these keys as read by every rank and delete them before the peers have (seen: a peer read a
// stopping rank's code, another found it gone and ended the rebalance a round earlier).
void cpu_group::post_min(std::int64_t value, std::int64_t rebalance, std::int64_t round) {
  const auto own = fmt::format("min/{}/{}/{}", rebalance, round, rank_);
  set_own(own, std::to_string(value));
  std::lock_guard lock(mutex_);
  auto& f = families_[fmt::format("min/{}", rebalance)];
  f.order = static_cast<std::uint64_t>(rebalance);
  f.ahead.push_back(own);
}

std::int64_t cpu_group::allreduce_min(std::int64_t value, std::int64_t rebalance, std::int64_t round) {
  const auto all = exchange(fmt::format("min/{}", rebalance), static_cast<std::uint64_t>(rebalance),
                            fmt::format("min/{}/{}", rebalance, round), std::to_string(value), timeout_);
  std::int64_t out = value;
  for (std::size_t r = 0; r < all.size(); ++r) {
    std::int64_t v = 0;
    const auto& text = all[r];
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || end != text.data() + text.size()) {
      fail(errc::transport, "cpu group: rank {}'s value of agreement round {}/{} is malformed", r, rebalance, round);
    }
    out = std::min(out, v);
  }
  return out;
}

}  // namespace eplb::runtime

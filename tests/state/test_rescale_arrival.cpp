// rescale()'s arrival agreement (issue 20): every rank of the current set arrives before any ends
// the rebalance it runs, so an async rank still in the step before sees no failure of its peers';
// a rank that comes after the timeout, or after a different step, makes every rank throw with
// nothing changed, and a retry on every rank works; the arrival posts leave the store once read.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>

#include <sys/wait.h>
#include <unistd.h>

#include "check_error.hpp"
#include "comm/host_identity.hpp"
#include "comm/rank_record.hpp"
#include "on_ranks.hpp"
#include "state/live_set.hpp"
#include "state/loopback_ranks.hpp"

using namespace eplb;
using eplb::testing::on_ranks;
using namespace eplb::testing::loopback_ranks;

namespace {

// The keys a store holds now, by name: what the counts of store_usage cannot tell.
class key_ledger final : public comm::store {
 public:
  explicit key_ledger(std::shared_ptr<comm::store> inner) : inner_(std::move(inner)) {}
  void set(const std::string& key, const std::string& value) override {
    inner_->set(key, value);
    held(key);
  }
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override {
    return inner_->get(key, timeout);
  }
  std::int64_t add(const std::string& key, std::int64_t delta) override {
    const auto v = inner_->add(key, delta);
    held(key);
    return v;
  }
  std::string set_if_absent(const std::string& key, const std::string& value) override {
    auto v = inner_->set_if_absent(key, value);
    held(key);
    return v;
  }
  void erase(const std::string& key) override {
    inner_->erase(key);
    std::lock_guard lock(mutex_);
    keys_.erase(key);
  }
  comm::store_usage usage() override { return inner_->usage(); }
  // The keys held now whose name contains `part`.
  std::vector<std::string> holding(const std::string& part) {
    std::lock_guard lock(mutex_);
    std::vector<std::string> out;
    for (const auto& k : keys_) {
      if (k.find(part) != std::string::npos) out.push_back(k);
    }
    return out;
  }

 private:
  void held(const std::string& key) {
    std::lock_guard lock(mutex_);
    keys_.insert(key);
  }
  std::shared_ptr<comm::store> inner_;
  std::mutex mutex_;
  std::set<std::string> keys_;
};

comm::setup loopback_setup(const std::shared_ptr<comm::loopback_world>& world) {
  comm::setup s;
  s.world = world;
  return s;
}

struct rank_outcome {
  std::vector<std::string> failures;  // byte mismatches and unexpected errors
  std::vector<std::string> rescale_errors;
  matrix<expert_id> maps_before, maps_after_failure, maps;
  int num_ranks_after_failure = 0;
  bool left = false;
};

// One step of skewed load; a step error or a wrong byte after a commit is a failure.
void serve(rank_setup& r, int step, rank_outcome& out) {
  const int slots = r.state->num_ranks() * 4;
  for (int l = 0; l < 4; ++l) r.state->record_load(l, skewed_counts(slots, step, l + step / 7, r.state->rank()));
  try {
    (void)r.state->step();
  } catch (const std::exception& e) {
    out.failures.push_back(fmt::format("step {}: {}", step, e.what()));
  }
}

void verify_all(rank_setup& r, rank_outcome& out, const char* when) {
  for (int l = 0; l < 4; ++l) {
    if (auto bad = verify(r, l, r.state->rank()); !bad.empty())
      out.failures.push_back(fmt::format("{}: {}", when, bad));
  }
}

// A rescale 4 -> 3 (rank 1 leaves) expected to fail with `code` and a message holding `want`.
void failed_rescale(rank_setup& r, const rescale_params& p, errc code, const std::string& want, rank_outcome& out) {
  try {
    (void)r.state->rescale(p);
    out.failures.push_back("the rescale succeeded");
  } catch (const error& e) {
    out.rescale_errors.push_back(e.what());
    if (e.code() != code || std::string(e.what()).find(want) == std::string::npos) {
      out.failures.push_back(fmt::format("rescale threw [{}] {}", to_string(e.code()), e.what()));
    }
  }
  out.maps_after_failure = r.state->maps().phy2log();
  out.num_ranks_after_failure = r.state->num_ranks();
  verify_all(r, out, "after the failed rescale");
}

// The retry, expected to work on every rank: what it did, a byte check, the maps after it.
void retried_rescale(rank_setup& r, const rescale_params& p, rank_outcome& out) {
  try {
    out.left = r.state->rescale(p).left;
    if (!out.left) verify_all(r, out, "after the retried rescale");
  } catch (const std::exception& e) {
    out.failures.push_back(fmt::format("the retry: {}", e.what()));
  }
  out.maps = r.state->maps().phy2log();
}

}  // namespace

TEST_CASE("rescale: a rank later than the timeout makes every rank throw with nothing changed; a retry works") {
  for (const bool use_async : {false, true}) {
    CAPTURE(use_async);
    auto ledger = std::make_shared<key_ledger>(comm::make_memory_store());
    auto world4 = comm::make_loopback_world(4);
    auto world3 = comm::make_loopback_world(3);
    const auto results = on_ranks(4, [&](int rank) {
      rank_outcome out;
      auto r = make_model(rank, 4);
      r.state =
          std::make_unique<eplb_state>(params_for(r, rank, loopback_config(use_async, 10, 10, 1s), world4, ledger));
      for (int step = 1; step <= 25; ++step) serve(r, step, out);
      out.maps_before = r.state->maps().phy2log();
      const rescale_params p{.new_size = 3, .rank_mapping = {0, -1, 1, 2}, .comm_setup = loopback_setup(world3)};
      // Rank 2 comes 1.5 s late: its peers give up after 1 s, it reads their decision at once.
      if (rank == 2) std::this_thread::sleep_for(1500ms);
      failed_rescale(r, p, errc::timeout,
                     "ranks 2 did not call rescale() within 1000 ms of their peers; nothing changed", out);
      try {
        out.left = r.state->rescale(p).left;
        if (!out.left) verify_all(r, out, "after the retried rescale");
        for (int step = 26; !out.left && step <= 45; ++step) serve(r, step, out);
      } catch (const std::exception& e) {
        out.failures.push_back(fmt::format("the retry: {}", e.what()));
      }
      out.maps = r.state->maps().phy2log();
      if (!out.left) {
        r.state->drain();
        for (int extra = 0; extra < 2000 && r.state->stats().rebalance_in_flight; ++extra) serve(r, 46, out);
      }
      return out;
    });
    for (int rank = 0; rank < 4; ++rank) {
      CAPTURE(rank);
      const auto& o = results[static_cast<std::size_t>(rank)];
      for (const auto& f : o.failures) FAIL_CHECK(f);
      CHECK(o.num_ranks_after_failure == 4);
      CHECK(o.maps_after_failure == o.maps_before);
      CHECK(o.maps_before == results[0].maps_before);
      CHECK(o.left == (rank == 1));
      if (rank != 1) CHECK(o.maps == results[0].maps);
    }
    CHECK(results[0].maps.cols() == 12);
    // The posts of both attempts were erased (the failed one's at once, the other's after the
    // moves); the two decisions stay for ranks that come late.
    CHECK(ledger->holding("/alive-") == std::vector<std::string>{});
    CHECK(ledger->holding("-arrive-").size() == 2);
    // Where each rank's process runs: one key for each rank of the new set, none of the old set's.
    CHECK(ledger->holding("eplb-who-") == std::vector<std::string>{"eplb-who-1/0", "eplb-who-1/1", "eplb-who-1/2"});
  }
}

TEST_CASE("rescale: ranks that call it after different steps get invalid_argument naming both, nothing changed") {
  auto store = comm::make_memory_store();
  auto world4 = comm::make_loopback_world(4);
  auto world3 = comm::make_loopback_world(3);
  const auto results = on_ranks(4, [&](int rank) {
    rank_outcome out;
    auto r = make_model(rank, 4);
    r.state = std::make_unique<eplb_state>(params_for(r, rank, loopback_config(false, 10, 10, 2s), world4, store));
    // Sync: rebalances in steps 10 and 20 only, so rank 0's extra step 13 needs no peer.
    for (int step = 1; step <= (rank == 0 ? 13 : 12); ++step) serve(r, step, out);
    out.maps_before = r.state->maps().phy2log();
    const rescale_params p{.new_size = 3, .rank_mapping = {0, -1, 1, 2}, .comm_setup = loopback_setup(world3)};
    failed_rescale(r, p, errc::invalid_argument, "call it on every rank between the same two steps (nothing changed)",
                   out);
    if (rank != 0) serve(r, 13, out);
    retried_rescale(r, p, out);  // now after the same step everywhere
    return out;
  });
  for (int rank = 0; rank < 4; ++rank) {
    CAPTURE(rank);
    const auto& o = results[static_cast<std::size_t>(rank)];
    for (const auto& f : o.failures) FAIL_CHECK(f);
    REQUIRE(o.rescale_errors.size() == 1);
    CHECK(o.rescale_errors[0] == (rank == 0
                                      ? fmt::format("eplb_state::rescale: rank 1 called it after 12 steps, rank 0 "
                                                    "after 13: call it on every rank between the same two steps "
                                                    "(nothing changed)")
                                      : fmt::format("eplb_state::rescale: rank 0 called it after 13 steps, rank {} "
                                                    "after 12: call it on every rank between the same two steps "
                                                    "(nothing changed)",
                                                    rank)));
    CHECK(o.maps_after_failure == o.maps_before);
    CHECK(o.left == (rank == 1));
    if (rank != 1) CHECK(o.maps == results[0].maps);
  }
}

TEST_CASE("rescale: one rank's bad parameters, its peers time out; the retry on every rank works") {
  // The bad rank throws before it arrives; its peers' arrival times out. Every call takes one
  // attempt number on every rank, so the retry's keys match.
  auto store = comm::make_memory_store();
  auto world4 = comm::make_loopback_world(4);
  auto world3 = comm::make_loopback_world(3);
  std::atomic<int> failed{0};
  const auto results = on_ranks(4, [&](int rank) {
    rank_outcome out;
    auto r = make_model(rank, 4);
    r.state = std::make_unique<eplb_state>(params_for(r, rank, loopback_config(false, 10, 10, 1s), world4, store));
    for (int step = 1; step <= 12; ++step) serve(r, step, out);
    const rescale_params good{.new_size = 3, .rank_mapping = {0, -1, 1, 2}, .comm_setup = loopback_setup(world3)};
    auto bad = good;
    bad.rank_mapping = {0, 0, 1, 2};
    if (rank == 2) {
      failed_rescale(r, bad, errc::invalid_argument, "rescale_params.rank_mapping", out);
    } else {
      failed_rescale(r, good, errc::timeout, "ranks 2 did not call rescale()", out);
    }
    // The engine retries once every rank knows the first call failed (ranks step in lockstep):
    // the bad rank's own failure came at once, its peers' after their timeout.
    ++failed;
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (failed < 4 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
    retried_rescale(r, good, out);
    return out;
  });
  for (int rank = 0; rank < 4; ++rank) {
    CAPTURE(rank);
    const auto& o = results[static_cast<std::size_t>(rank)];
    for (const auto& f : o.failures) FAIL_CHECK(f);
    CHECK(o.left == (rank == 1));
    if (rank != 1) CHECK(o.maps == results[0].maps);
  }
}

TEST_CASE("arrival agreement: a rank that answers after its peers' timeout is left out, and told so") {
  auto store = comm::make_memory_store();
  const auto begin = std::chrono::steady_clock::now();
  struct outcome {
    state_detail::live_set live;
    matrix<expert_id> owners;
    std::string error;
  };
  const auto results = on_ranks(3, [&](int rank) {
    outcome out;
    if (rank == 2) std::this_thread::sleep_for(700ms);  // silent past the others' 300 ms
    try {
      const auto posted = state_detail::agree_arrivals(
          *store, "eplb-live-5", rank, 3, {100 + rank, 7 - rank, matrix<expert_id>(2, 1, rank)}, 300ms, {});
      out.live = state_detail::live_set_of(posted, 5, rank, 300ms);
      out.owners = state_detail::owners_view(posted, 1);
    } catch (const error& e) {
      CHECK(e.code() == errc::peer_failure);
      out.error = e.what();
    }
    return out;
  });
  matrix<expert_id> owners(2, 3, empty_slot);  // each survivor's one slot as it posted it; rank 2's empty
  for (std::size_t l = 0; l < 2; ++l) owners(l, 0) = 0, owners(l, 1) = 1;
  for (int rank : {0, 1}) {
    CHECK(results[rank].error == "");
    CHECK(results[rank].live.ranks == std::vector<int>{0, 1});
    CHECK(results[rank].live.last_step == 101);     // the most steps either served
    CHECK(results[rank].live.last_rebalance == 7);  // the most rebalances either triggered
    CHECK(results[rank].owners == owners);
  }
  CHECK(results[2].error ==
        "rank 2 was left out of the live set of epoch 5 (it answered after its peers' timeout of "
        "300 ms)");
  // The late rank read the decision at once: it did not wait its own 300 ms for posts.
  CHECK(std::chrono::steady_clock::now() - begin < 900ms);
}

// recover()'s fast path: a rank whose posted process has exited on this host is known dead, so the
// agreement does not wait out its window for it; anything that cannot be told waits as before.
TEST_CASE("arrival agreement: a peer whose process is gone from this host is not waited for") {
  auto store = comm::make_memory_store();
  state_detail::post_identity(*store, 3, 0);  // this process: alive
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  REQUIRE(child > 0);
  REQUIRE(::waitpid(child, nullptr, 0) == child);
  auto me = comm::this_process();
  auto exited = me;
  exited.pid = child;
  store->set("eplb-who-3/1", comm::encode(comm::rank_record{exited, {}}));
  auto elsewhere = exited;
  elsewhere.boot_id = "another-host";
  store->set("eplb-who-3/2", comm::encode(comm::rank_record{elsewhere, {}}));
  store->set("eplb-who-3/3", "not a record");
  auto alive = exited;
  alive.pid = ::getppid();
  store->set("eplb-who-3/4", comm::encode(comm::rank_record{alive, {}}));
  const auto gone = state_detail::peer_gone(*store, 3);
  CHECK(!gone(0));                                // this process
  CHECK(gone(1));                                 // exited here
  CHECK(!gone(2));                                // another host: cannot tell
  CHECK(!gone(3));                                // malformed
  CHECK(!gone(4));                                // alive
  CHECK(!gone(5));                                // never posted
  CHECK(!state_detail::peer_gone(*store, 4)(1));  // another set's numbering
  // Rank 1 of 2 never posts: the agreement ends at once instead of after 5 s.
  const auto begin = std::chrono::steady_clock::now();
  const auto posted = state_detail::agree_arrivals(*store, "eplb-live-4", 0, 2, {10, 1, matrix<expert_id>(1, 1, 0)}, 5s,
                                                   {}, false, gone);
  CHECK(posted.ranks == std::vector<int>{0});
  CHECK(std::chrono::steady_clock::now() - begin < 1s);
  state_detail::erase_identity(*store, 3, 0);
  CHECK_EPLB_ERROR(store->get("eplb-who-3/0", 1ms), errc::timeout, "eplb-who-3/0");
}

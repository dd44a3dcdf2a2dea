#include "runtime/stoppable_store.hpp"

#include <algorithm>

#include "runtime/cpu_group.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::runtime {
namespace {

class stoppable_store final : public comm::store {
 public:
  stoppable_store(std::shared_ptr<comm::store> inner, std::stop_token stop)
      : inner_(std::move(inner)), stop_(std::move(stop)) {}

  // Every operation refuses once stopped: store_barrier (Gloo's "connected" meeting) polls add()
  // in a loop of its own, which ends here then.
  void set(const std::string& key, const std::string& value) override {
    check(key);
    inner_->set(key, value);
  }
  std::int64_t add(const std::string& key, std::int64_t delta) override {
    check(key);
    return inner_->add(key, delta);
  }
  std::string set_if_absent(const std::string& key, const std::string& value) override {
    check(key);
    return inner_->set_if_absent(key, value);
  }
  void erase(const std::string& key) override { inner_->erase(key); }
  comm::store_usage usage() override { return inner_->usage(); }

  // The inner store's timeout error when the whole wait runs out (it names the key and the store).
  std::string get(const std::string& key, comm::milliseconds timeout) override {
    const auto deadline = deadline_after(timeout);
    for (;;) {
      check(key);
      const auto left = std::chrono::duration_cast<comm::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= wait_slice || !stop_.stop_possible()) return inner_->get(key, std::max(left, comm::milliseconds(0)));
      try {
        return inner_->get(key, wait_slice);
      } catch (const error& e) {
        if (e.code() != errc::timeout) throw;
      }
    }
  }

 private:
  void check(const std::string& key) const {
    if (stop_.stop_requested()) fail(errc::cancelled, "store: stopped (key \"{}\")", key);
  }

  std::shared_ptr<comm::store> inner_;
  std::stop_token stop_;
};

}  // namespace

std::shared_ptr<comm::store> make_stoppable_store(std::shared_ptr<comm::store> inner, std::stop_token stop) {
  return std::make_shared<stoppable_store>(std::move(inner), std::move(stop));
}

}  // namespace eplb::runtime

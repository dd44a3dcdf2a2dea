// The communicator a state moves weights through: made at start (or handed in), and made again
// under a new generation after a failed rebalance, on every rank for the same rebalance, so that
// nothing of a broken communicator's rendezvous is read again. Touched by the serving thread in sync
// mode and by the background thread in async mode (the serving thread reads kind() only).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>

#include "eplb/state.hpp"

namespace eplb::state_detail {

class comm_owner {
 public:
  /// Takes the communicator, factory, wrapper and setup out of `p`; makes generation 0. The
  /// rendezvous of a communicator made later observes `stop` (runtime::make_stoppable_store).
  comm_owner(state_params& p, std::stop_token stop);

  [[nodiscard]] comm::communicator& get() const noexcept { return *comm_; }
  [[nodiscard]] comm::backend kind() const noexcept { return kind_; }
  /// Any thread: the serving thread reads it (records, events) while the background remakes.
  [[nodiscard]] int generation() const noexcept { return generation_.load(std::memory_order_acquire); }

  /// A rebalance failed: the communicator may be broken. take_suspect() reads and clears it.
  void mark_suspect() noexcept { suspect_ = true; }
  [[nodiscard]] bool take_suspect() noexcept { return std::exchange(suspect_, false); }

  /// Whether remake() makes a new one (a communicator handed in without a factory is kept).
  [[nodiscard]] bool can_remake() const noexcept { return can_remake_; }
  /// Makes generation `generation`, then the old one goes (its waits are bounded by the timeout).
  /// `adopt` hands the new one to its users before the old one is destroyed.
  void remake(int generation, const std::function<void(comm::communicator&)>& adopt);

  /// Aborts the communicator (communicator::abort), and any made later, from any thread: the
  /// remaking thread may be swapping it meanwhile.
  void abort(const std::string& why) noexcept;
  /// Allocates the communicator's batch memory now (communicator::reserve_memory()), and that of
  /// every communicator made again later, as it is made. Returns what the current one holds.
  device::memory_use reserve();

  /// Destroys the communicator (its threads and its own staging) now.
  void reset() noexcept { comm_.reset(); }

 private:
  [[nodiscard]] std::unique_ptr<comm::communicator> make(int generation) const;
  [[nodiscard]] comm::setup tuned_setup(int generation) const;

  config cfg_;
  int rank_;
  int size_;
  device::device* dev_;
  std::shared_ptr<comm::store> store_;
  comm::backend backend_;
  comm::setup setup_;
  std::function<std::unique_ptr<comm::communicator>(int)> factory_;
  std::function<std::unique_ptr<comm::communicator>(std::unique_ptr<comm::communicator>, int)> wrap_;
  bool can_remake_;
  std::atomic<int> generation_{0};
  bool suspect_ = false;
  comm::backend kind_;  // fixed at start: read by the serving thread while the background remakes
  std::stop_token stop_;
  std::mutex swap_mutex_;               // abort() against remake()'s swap
  std::optional<std::string> aborted_;  // under swap_mutex_: why abort() was called
  bool reserved_ = false;               // reserve() ran: communicators made later reserve too
  std::unique_ptr<comm::communicator> comm_;
};

}  // namespace eplb::state_detail

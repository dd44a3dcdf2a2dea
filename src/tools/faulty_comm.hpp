// Fault injection for `eplb simulate` and the stress tests: a communicator around another that
// fails one armed batch. The batch runs (peers get their bytes), then reports errc::transport on
// this rank, and the communicator stays broken from then on, as gloo, nccl and cuda_ipc do after a
// failed batch. Optionally a random delay before half the batches.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <random>
#include <thread>

#include "comm/transport.hpp"
#include "eplb/comm/communicator.hpp"
#include "eplb/error.hpp"

namespace eplb::tools {

/// Shared by the communicators a rank makes over time (eplb_state makes new ones after failures).
struct fault_switch {
  std::atomic<int> countdown{0};  ///< the n-th batch from when this is set fails (0: none armed)
  std::atomic<bool> fired{false};
  std::atomic<int> made{0};  ///< communicators made so far (counted by whoever makes them)
  /// The failing batch also overwrites what it received with 0xEE bytes (host memory only), as a
  /// transfer that broke half-way may leave anything there.
  bool scribble = false;
};

class faulty_transport final : public comm::transport {
 public:
  faulty_transport(std::unique_ptr<comm::communicator> inner, std::shared_ptr<fault_switch> sw, std::uint64_t seed,
                   std::chrono::microseconds max_delay)
      : transport(inner->rank(), inner->size()),
        inner_(std::move(inner)),
        switch_(std::move(sw)),
        rng_(seed),
        max_delay_(max_delay) {}
  comm::backend kind() const noexcept override { return inner_->kind(); }
  comm::capabilities caps() const noexcept override { return inner_->caps(); }
  comm::registration register_memory(std::span<std::byte> region) override { return inner_->register_memory(region); }
  comm::registered_memory allocate_registered(std::size_t bytes) override { return inner_->allocate_registered(bytes); }
  device::memory_use reserve_memory() override { return inner_->reserve_memory(); }

  void run(std::span<const comm::op> ops) override {
    if (broken_) throw error(errc::transport, fmt::format("rank {}: broken by an earlier failure", rank()));
    if (max_delay_.count() > 0 && rng_() % 2 == 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(rng_() % static_cast<std::uint64_t>(max_delay_.count())));
    }
    inner_->set_stream(stream());
    for (const auto& o : ops) {
      if (o.is_send) {
        inner_->add_send({o.data, o.bytes}, o.peer);
      } else {
        inner_->add_recv({o.data, o.bytes}, o.peer);
      }
    }
    inner_->execute();
    if (switch_->countdown.load() > 0 && --switch_->countdown == 0) {
      switch_->fired = true;
      broken_ = true;
      for (const auto& o : ops) {
        if (switch_->scribble && !o.is_send) std::fill_n(static_cast<std::byte*>(o.data), o.bytes, std::byte{0xEE});
      }
      throw error(errc::transport, fmt::format("injected transfer fault on rank {}", rank()));
    }
  }

 private:
  void on_abort(const std::string& why) noexcept override { inner_->abort(why); }

  std::unique_ptr<comm::communicator> inner_;
  std::shared_ptr<fault_switch> switch_;
  std::mt19937_64 rng_;  // the running thread's only
  std::chrono::microseconds max_delay_;
  bool broken_ = false;  // the running thread's only
};

/// A communicator over a faulty_transport around `inner`.
class faulty_communicator final : public comm::communicator {
 public:
  faulty_communicator(std::unique_ptr<comm::communicator> inner, std::shared_ptr<fault_switch> sw,
                      std::uint64_t seed = 0, std::chrono::microseconds max_delay = {})
      : communicator(std::make_unique<faulty_transport>(std::move(inner), std::move(sw), seed, max_delay)) {}
};

}  // namespace eplb::tools

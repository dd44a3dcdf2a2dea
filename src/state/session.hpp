// A rebalance session: what happens between the trigger of a rebalance and its end, behind one
// interface with two strategies. Sync (sync_session): the whole rebalance runs inside the step that
// triggers it, on the serving stream, every batch's write decided by all ranks. Async
// (async_session): a background coroutine stages layers on a side stream while the serving loop runs
// on; layers every rank has staged commit at step boundaries, in the same step on every rank.
// Called from the serving thread only.
#pragma once

#include <chrono>
#include <memory>
#include <stop_token>

#include "eplb/state.hpp"
#include "state/comm_owner.hpp"
#include "state/device_maps.hpp"
#include "state/records.hpp"

namespace eplb::state_detail {

using clock_type = std::chrono::steady_clock;

/// How long stop() waits for a stream's queued work (the serving stream, the side stream): short,
/// so that stop() stays bounded; memory that work touches is released after it by the device.
inline constexpr std::chrono::milliseconds stop_stream_wait{100};

/// What a session works on; owned by the state, which outlives its session.
struct session_context {
  const config& cfg;
  const model_desc& model;
  int rank;
  device::device& dev;
  device::stream& serving;
  exec::rank_weights& weights;
  placement& maps;         // what the serving loop routes by: committed layers only
  device_maps& published;  // the same maps in device memory
  comm_owner& comms;
  metrics& m;
  rebalance_records& records;          // the open rebalance's record: serving thread only
  std::shared_ptr<comm::store> store;  // the CPU collectives' rendezvous
  std::stop_token stop;                // eplb_state::stop() requested: every store wait ends (cancelled)
};

class rebalance_session {
 public:
  virtual ~rebalance_session() = default;
  rebalance_session() = default;
  rebalance_session(const rebalance_session&) = delete;
  rebalance_session& operator=(const rebalance_session&) = delete;

  /// Starts rebalance number m.rebalances (the same on every rank) from this rank's logical load
  /// over the window. Sync: runs it to the end (or throws); async: returns at once.
  virtual void start(const matrix<double>& local_load, step_report& report) = 0;
  /// Once per step while in_flight(): commits what every rank has staged (async only). Throws when
  /// the rebalance failed here or on a peer.
  virtual void advance(step_report& report) = 0;
  [[nodiscard]] virtual bool in_flight() const noexcept = 0;
  /// This step ended a failed rebalance: as on the peers, no new one starts in this step.
  [[nodiscard]] virtual bool ended_this_step_by_failure() const noexcept = 0;
  /// step() threw while in flight: tells the peers and gives up this rank's part.
  virtual void on_step_failure() noexcept = 0;
  /// Tells the peers this rank stops (cpu_group::announce_stop, after which it writes no round key;
  /// async mid-rebalance: its failure code in the rounds they wait for first), aborts the
  /// communicator (transfers in flight end now) and, async, waits for the background to end:
  /// bounded by a few store slices, not by the timeout, since ctx.stop was requested before.
  virtual void stop() noexcept = 0;
  /// Allocates the staging and packing memory rebalances use (eplb_state::reserve()); only while
  /// nothing is in flight. Returns the bytes the session holds for them.
  virtual device::memory_use reserve_memory() = 0;
  /// Allocations rebalances made past the reservation (any thread's; read by the serving thread).
  [[nodiscard]] virtual std::int64_t reserve_overflows() const noexcept = 0;
};

/// The strategy cfg.use_async picks. `agreement` is the engine's commit agreement, if any (async).
[[nodiscard]] std::unique_ptr<rebalance_session> make_session(const session_context& ctx,
                                                              std::function<std::int64_t(std::int64_t)> agreement);

}  // namespace eplb::state_detail

#include "eplb/state.hpp"

#include <fmt/format.h>

#include <deque>
#include <iostream>

#include "eplb/core/load.hpp"
#include "eplb/core/policy.hpp"
#include "eplb/exec/rearrange.hpp"
#include "runtime/agreement.hpp"
#include "runtime/async_runtime.hpp"
#include "runtime/background_threads.hpp"
#include "runtime/commit_vote.hpp"
#include "runtime/cpu_group.hpp"
#include "util/fail.hpp"

namespace eplb {

using clock_type = std::chrono::steady_clock;

struct eplb_state::impl {
  config cfg;
  model_desc model;
  int rank;
  device::device& dev;
  device::stream& serving;
  exec::rank_weights weights;
  std::function<std::int64_t(std::int64_t)> agreement;
  std::function<void(std::string_view)> log;
  comm::backend backend;
  std::shared_ptr<comm::store> store;
  comm::setup comm_setup;
  std::function<std::unique_ptr<comm::communicator>(int)> comm_factory;
  std::function<std::unique_ptr<comm::communicator>(std::unique_ptr<comm::communicator>, int)> comm_wrap;
  bool can_remake_comm;
  int comm_generation = 0;
  bool comm_suspect = false;  // a rebalance failed: the communicator may be broken
  comm::backend comm_kind;    // read by the serving thread while the background may remake `comm`

  std::unique_ptr<comm::communicator> comm;
  std::unique_ptr<device::stream> side;  // async only
  std::unique_ptr<exec::rearranger> mover;
  std::unique_ptr<runtime::cpu_group> group;
  std::unique_ptr<runtime::background_threads> threads;  // async: the io thread and the blocking pool
  std::unique_ptr<runtime::async_runtime> background;
  std::unique_ptr<runtime::lagged_min> agree;  // async, unless the engine supplies the agreement
  std::unique_ptr<runtime::commit_vote> vote;  // sync: every batch's write is decided by all ranks
  std::optional<std::int64_t> failed_code;     // this rank failed; the group has not seen it yet
  bool commits_after_failure = true;           // failed_code: rounds from before the failure still commit
  bool ended_by_failure = false;               // this step ended a failed rebalance

  placement maps;
  load_window window;
  metrics m;

  // Load: the engine increments `load`; each step copies it into a pinned slot and clears it, in
  // stream order; slots are folded into the window once their copy is done (no host wait). The
  // buffers here are stream_buffers: after a timed-out wait the serving stream may still touch
  // them, so they are freed only once it has passed what was queued.
  std::size_t load_count;
  device::stream_buffer load;
  std::vector<device::stream_buffer> load_ring;
  struct pending_load {
    int slot;
    bool dummy;
    device::event copied;
  };
  std::deque<pending_load> pending;
  int next_ring = 0;
  std::vector<std::int64_t> host_extra;
  std::vector<std::int64_t> folded;

  // Device maps and their pinned mirrors (one region per layer, rewritten once per commit).
  int max_rep;
  device::stream_buffer dev_phy2log, dev_log2phy, dev_counts;
  device::stream_buffer pin_phy2log, pin_log2phy, pin_counts;
  std::vector<device::event> map_copied;  // per layer: last copy out of its mirror region

  std::int64_t since_rebalance;
  double pending_before = 0;  // balancedness of the rebalance in flight, before it (async)
  bool in_flight = false;
  std::optional<runtime::rebalance_inputs> deferred;  // async: started, background part not yet
  clock_type::time_point deferred_since;
  int committed = 0;
  clock_type::time_point trigger_time;
  bool stopped = false;

  impl(state_params& p)
      : cfg(p.cfg),
        model(p.model),
        rank(p.rank),
        dev(*p.dev),
        serving(*p.serving_stream),
        weights(std::move(p.weights)),
        agreement(std::move(p.commit_agreement)),
        log(std::move(p.log)),
        backend(p.cfg.resolved_communicator()),
        store(p.store),
        comm_setup(p.comm_setup),
        comm_factory(std::move(p.comm_factory)),
        comm_wrap(std::move(p.comm_wrap)),
        can_remake_comm(comm_factory || !p.comm),
        maps(initial_map(p), p.model.shape.num_logical, p.model.shape.num_ranks, "initial_phy2log"),
        window(p.cfg.window_size, p.model.shape.layers, p.model.shape.num_physical),
        load_count(static_cast<std::size_t>(p.model.shape.layers) *
                   static_cast<std::size_t>(p.model.shape.num_physical)),
        max_rep(p.model.shape.num_physical - p.model.shape.num_logical + 1),
        since_rebalance(p.cfg.step_interval - p.cfg.step_interval / 4) {
    const auto& shape = model.shape;
    const bool on_gpu = dev.kind() == device::backend_kind::cuda;
    const auto mem = on_gpu ? device::memory_kind::device : device::memory_kind::host;
    if (comm_wrap && (comm_factory || p.comm)) {
      fail(errc::invalid_argument,
           "eplb_state: comm_wrap wraps the communicators eplb makes itself; with {} it would "
           "never be used",
           comm_factory ? "comm_factory" : "a communicator handed in");
    }
    // One layer of this rank's slots (rearranger::layer_area_bytes()): the least staging either
    // async mode or registered buffers can work with.
    const std::size_t area = shape.expert_bytes() * static_cast<std::size_t>(shape.slots_per_rank());
    if (cfg.register_buffers && !cfg.use_async && cfg.staging_bytes != 0 && cfg.staging_bytes < area) {
      fail(errc::invalid_config,
           "register_buffers: true is not allowed with staging_bytes = {} (registered transfers need one layer of "
           "this rank in one piece: {} bytes)",
           cfg.staging_bytes, area);
    }
    comm = p.comm ? std::move(p.comm) : comm_factory ? comm_factory(0) : make_comm(0);
    if (!comm) fail(errc::invalid_argument, "eplb_state: comm_factory(0) returned no communicator");
    comm_kind = comm->kind();
    if (comm->kind() != backend && p.cfg.communicator != "auto") {
      fail(errc::invalid_config, "communicator: config says \"{}\", the communicator given is {}", cfg.communicator,
           comm::to_string(comm->kind()));
    }
    if (cfg.use_async && !comm->caps().background_safe) {
      fail(errc::invalid_config, "communicator: {} is not safe from a background thread (it launches NCCL kernels)",
           comm::to_string(comm->kind()));
    }
    group = std::make_unique<runtime::cpu_group>(comm::make_prefix_store(p.store, "eplb-cpu"), rank, shape.num_ranks,
                                                 cfg.timeout);
    exec::rearrange_options opts{.staging_bytes = cfg.use_async ? 0 : cfg.staging_bytes,
                                 .timeout = cfg.timeout,
                                 .register_buffers = cfg.register_buffers};
    if (cfg.use_async) {
      side = dev.create_stream();
      mover = std::make_unique<exec::rearranger>(shape, rank, dev, *side, *comm, opts);
      const int areas =
          cfg.staging_bytes == 0 ? 2 : static_cast<int>(std::max<std::size_t>(1, cfg.staging_bytes / area));
      if (cfg.staging_bytes != 0 && cfg.staging_bytes < area) {
        fail(errc::invalid_config,
             "staging_bytes: {} is not allowed in async mode (one layer of this rank needs {} bytes)",
             cfg.staging_bytes, area);
      }
      threads = std::make_unique<runtime::background_threads>();
      background =
          std::make_unique<runtime::async_runtime>(*threads, *mover, weights, *group, dev, *side, areas, cfg.timeout);
      if (!agreement) {
        agree = std::make_unique<runtime::lagged_min>(*group, threads->pool(), cfg.commit_lag_steps, cfg.timeout);
      }
    } else {
      vote = std::make_unique<runtime::commit_vote>(comm::make_prefix_store(p.store, "eplb-cpu"), rank, shape.num_ranks,
                                                    cfg.timeout);
      opts.commit_gate = [v = vote.get()](int layer, int chunk, std::exception_ptr failure) {
        return v->decide(layer, chunk, failure);
      };
      mover = std::make_unique<exec::rearranger>(shape, rank, dev, serving, *comm, opts);
    }
    const auto on_serving = [&](std::size_t bytes, device::memory_kind kind) {
      return device::stream_buffer(dev, serving, bytes, kind);
    };
    load = on_serving(load_count * sizeof(std::int64_t), mem);
    serving.fill(load.data(), std::byte{0}, load.size());
    for (int i = 0; i < 4; ++i) load_ring.push_back(on_serving(load.size(), device::memory_kind::pinned));
    host_extra.assign(load_count, 0);
    const auto L = static_cast<std::size_t>(shape.layers);
    const auto R = static_cast<std::size_t>(shape.num_physical);
    const auto E = static_cast<std::size_t>(shape.num_logical);
    const auto W = static_cast<std::size_t>(max_rep);
    dev_phy2log = on_serving(L * R * 4, mem);
    dev_log2phy = on_serving(L * E * W * 4, mem);
    dev_counts = on_serving(L * E * 4, mem);
    pin_phy2log = on_serving(L * R * 4, device::memory_kind::pinned);
    pin_log2phy = on_serving(L * E * W * 4, device::memory_kind::pinned);
    pin_counts = on_serving(L * E * 4, device::memory_kind::pinned);
    map_copied.resize(L);
    for (int l = 0; l < shape.layers; ++l) publish_maps(l);
    serving.synchronize(cfg.timeout);
  }

  // Ends what may still touch staging before it goes (member order does the same when the
  // constructor throws): the background thread first (it waits for the transfer in flight), then
  // the mover, whose staging the device frees once the streams have passed the work queued on it,
  // then the side stream (its worker stops, queued work is cancelled), then the communicator (its
  // threads and its own staging). The staging areas are read by the serving stream too.
  ~impl() {
    if (background) {
      background->stop();
      background->release_areas_after(serving);
    }
    background.reset();
    agree.reset();
    mover.reset();
    side.reset();
    comm.reset();
  }
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;

  static void validate(const state_params& p) {
    p.cfg.validate();
    p.model.shape.validate();
    if (p.dev == nullptr || p.serving_stream == nullptr) {
      fail(errc::invalid_argument, "eplb_state: dev and serving_stream are required");
    }
    if (!p.store) fail(errc::invalid_argument, "eplb_state: store is required (CPU collectives)");
    if (p.rank < 0 || p.rank >= p.model.shape.num_ranks) {
      fail(errc::invalid_argument, "eplb_state: rank {} is out of range for {} ranks", p.rank, p.model.shape.num_ranks);
    }
    if (p.model.shape.num_physical != p.model.shape.num_logical + p.cfg.num_redundant_experts) {
      fail(errc::invalid_config, "num_redundant_experts: {} does not match the model ({} slots for {} experts)",
           p.cfg.num_redundant_experts, p.model.shape.num_physical, p.model.shape.num_logical);
    }
    if (p.weights.base.size() != static_cast<std::size_t>(p.model.shape.layers)) {
      fail(errc::invalid_argument, "eplb_state: weights describe {} layers, the model has {}", p.weights.base.size(),
           p.model.shape.layers);
    }
    for (std::size_t l = 0; l < p.weights.base.size(); ++l) {
      const auto& layer = p.weights.base[l];
      if (layer.size() != p.model.shape.bundle.size()) {
        fail(errc::invalid_argument, "eplb_state: weights give {} tensors for a layer, the bundle has {}", layer.size(),
             p.model.shape.bundle.size());
      }
      for (std::size_t t = 0; t < layer.size(); ++t) {
        if (layer[t] == nullptr) {
          fail(errc::invalid_argument, "eplb_state: weights[{}][{}] ({}) is null", l, t, p.model.shape.bundle[t].name);
        }
      }
    }
    if (p.cfg.resolved_communicator() == comm::backend::cuda_ipc && p.model.num_nodes > 1) {
      fail(errc::invalid_config,
           "communicator: cuda_ipc connects the GPUs of one node, the model spans {} nodes (use gloo or nccl)",
           p.model.num_nodes);
    }
    // The policy's parameters (groups, nodes) now, not at the first rebalance.
    const auto& shape = p.model.shape;
    const matrix<double> no_load(static_cast<std::size_t>(shape.layers), static_cast<std::size_t>(shape.num_logical));
    try {
      eplb::validate(
          rebalance_input{no_load, shape.num_physical, p.model.num_groups, p.model.num_nodes, shape.num_ranks});
    } catch (const error& e) {
      fail(e.code(), "eplb_state: model: {}", e.what());
    }
  }

  static matrix<expert_id> initial_map(const state_params& p) {
    return p.initial_phy2log ? *p.initial_phy2log
                             : placement::initial(p.model.shape.layers, p.model.shape.num_logical,
                                                  p.model.shape.num_physical, p.model.shape.num_ranks)
                                   .phy2log();
  }

  // Generation 0 at start; a later one after a failed rebalance, under its own store prefix so that
  // nothing of the broken communicator's rendezvous is read again.
  std::unique_ptr<comm::communicator> make_comm(int generation) {
    comm::setup s = comm_setup;
    s.rank = rank;
    s.size = model.shape.num_ranks;
    if (!s.rendezvous) s.rendezvous = comm::make_prefix_store(store, "eplb-comm");
    if (generation > 0) s.rendezvous = comm::make_prefix_store(s.rendezvous, fmt::format("generation-{}", generation));
    if (s.dev == nullptr) s.dev = &dev;
    s.opts.timeout = cfg.timeout;
    if (cfg.use_async && (backend == comm::backend::gloo || backend == comm::backend::cuda_ipc)) {
      // Transfers yield the CPU to the serving loop (measured: p99 step time on 4 H200 ranks).
      if (s.opts.nice == 0) s.opts.nice = 10;
      // Fewer TCP streams keep the host's network stack responsive for the per-step agreement.
      if (backend == comm::backend::gloo && s.opts.lanes == 0) s.opts.lanes = 4;
      // gloo's shared-memory transport saturates PCIe and delayed the serving loop (2 H200 ranks,
      // Qwen3-30B shape: +12% mean step time, +67% p99, against +0% over TCP), so async keeps TCP
      // unless asked; asked, it is capped at 10 GB/s per rank (+0.5-3.1% mean, +4-11% p99 over four
      // runs, and the rebalance 1.7-1.8 s instead of TCP's 2.6-2.9 s).
      if (backend == comm::backend::gloo && s.opts.gloo_via == comm::gloo_transport::automatic) {
        s.opts.gloo_via = comm::gloo_transport::tcp;
      }
      if (backend == comm::backend::gloo && s.opts.gloo_via == comm::gloo_transport::shared_memory &&
          s.opts.cuda_ipc_max_gbps == 0) {
        s.opts.cuda_ipc_max_gbps = 10;
      }
    }
    auto made = comm::make_communicator(backend, s);
    return comm_wrap ? comm_wrap(std::move(made), generation) : std::move(made);
  }

  // After a failed rebalance, on every rank at the start of the next one (async: on the background
  // thread, right after the load all-reduce; the serving thread does not touch the communicator).
  void remake_comm() { remake_comm(comm_generation + 1); }
  void remake_comm(int generation) {
    auto fresh = comm_factory ? comm_factory(generation) : make_comm(generation);
    if (!fresh) fail(errc::invalid_argument, "eplb_state: comm_factory({}) returned no communicator", generation);
    if (fresh->kind() != comm_kind) {
      fail(errc::invalid_config, "eplb_state: comm_factory({}) made a {} communicator, the first one was {}",
           generation, comm::to_string(fresh->kind()), comm::to_string(comm_kind));
    }
    mover->set_communicator(*fresh);
    comm = std::move(fresh);  // the broken one goes (its waits are bounded by the timeout)
    comm_generation = generation;
  }

  // Writes layer `l` of the host maps into its mirror region and copies it out in stream order.
  void publish_maps(int l) {
    const auto& shape = model.shape;
    const auto R = static_cast<std::size_t>(shape.num_physical);
    const auto E = static_cast<std::size_t>(shape.num_logical);
    const auto W = static_cast<std::size_t>(max_rep);
    auto& done = map_copied[static_cast<std::size_t>(l)];
    if (done.valid()) done.wait(cfg.timeout);  // the region's previous copy has long finished
    auto* p2l = reinterpret_cast<std::int32_t*>(pin_phy2log.data()) + l * R;
    auto* l2p = reinterpret_cast<std::int32_t*>(pin_log2phy.data()) + l * E * W;
    auto* cnt = reinterpret_cast<std::int32_t*>(pin_counts.data()) + l * E;
    const auto row = maps.phy2log(l);
    std::copy(row.begin(), row.end(), p2l);
    std::fill(l2p, l2p + E * W, -1);
    for (std::size_t e = 0; e < E; ++e) {
      cnt[e] = maps.replica_count(l, static_cast<int>(e));
      const auto slots = maps.log2phy(l, static_cast<int>(e));
      std::copy_n(slots.begin(), std::min<std::size_t>(slots.size(), W), l2p + e * W);
    }
    serving.copy(dev_phy2log.data() + l * R * 4, p2l, R * 4);
    serving.copy(dev_log2phy.data() + l * E * W * 4, l2p, E * W * 4);
    serving.copy(dev_counts.data() + l * E * 4, cnt, E * 4);
    done = serving.record();
  }

  void drain_load(bool dummy) {
    // Keep the ring bounded: wait for the oldest copy only when every slot is in use.
    if (pending.size() == load_ring.size()) fold_one(true);
    const int slot = next_ring;
    next_ring = (next_ring + 1) % static_cast<int>(load_ring.size());
    if (!dummy) serving.copy(load_ring[static_cast<std::size_t>(slot)].data(), load.data(), load.size());
    serving.fill(load.data(), std::byte{0}, load.size());
    pending.push_back({slot, dummy, serving.record()});
    while (!pending.empty() && pending.front().copied.query()) fold_one(false);
  }

  void fold_one(bool wait) {
    auto p = pending.front();
    if (wait) p.copied.wait(cfg.timeout);
    pending.pop_front();
    if (p.dummy) return;  // dummy steps count as steps but record no load
    const auto* counts = reinterpret_cast<const std::int64_t*>(load_ring[static_cast<std::size_t>(p.slot)].data());
    folded.assign(counts, counts + load_count);
    for (std::size_t i = 0; i < load_count; ++i) folded[i] += std::exchange(host_extra[i], 0);
    window.record(folded);
  }

  void flush_load() {
    while (!pending.empty()) fold_one(true);
    if (std::any_of(host_extra.begin(), host_extra.end(), [](std::int64_t v) { return v != 0; })) {
      window.record(host_extra);
      std::fill(host_extra.begin(), host_extra.end(), 0);
    }
  }

  void log_balancedness() {
    matrix<double> per_slot(window.physical_totals().rows(), window.physical_totals().cols());
    std::transform(window.physical_totals().flat().begin(), window.physical_totals().flat().end(),
                   per_slot.flat().begin(), [](std::int64_t v) { return static_cast<double>(v); });
    const double b = balancedness_of_slots(per_slot, model.shape.num_ranks);
    const auto line = fmt::format("eplb rank {} step {}: balancedness {:.4f} (this rank's window)", rank, m.steps, b);
    if (log) {
      log(line);
    } else if (rank == 0) {
      std::cerr << line << '\n';
    }
  }

  void start_rebalance(step_report& report) {
    flush_load();
    const auto local = window.logical_load(maps);
    report.rebalance_started = true;
    ++m.rebalances;
    trigger_time = clock_type::now();
    const policy_kind policy = cfg.resolved_policy();
    if (cfg.use_async) {
      // The rebalance starts in this step on every rank (its agreement rounds from now on), but a
      // rebalance that failed (here or on a peer) may still be ending on the background thread: its
      // current transfer or device wait finishes within the timeout, then it stops (abandon()
      // cancelled it). The background part starts once it has, checked every step, so step() never
      // blocks on it; this rank posts "nothing staged" meanwhile.
      if (agree) agree->begin(m.rebalances);
      std::function<void()> prepare;
      if (std::exchange(comm_suspect, false) && can_remake_comm) prepare = [this] { remake_comm(); };
      deferred = runtime::rebalance_inputs{local,           maps.phy2log(),    policy, model.num_groups,
                                           model.num_nodes, std::move(prepare)};
      deferred_since = clock_type::now();
      in_flight = true;
      committed = 0;
      m.rebalance_in_flight = true;
      (void)start_background_when_idle();  // not late yet: it was deferred just now
      return;
    }
    // Sync: everything happens inside this step, on the serving stream. A failure anywhere (here or
    // on a peer) ends it on every rank at the same batch: the vote decides each batch's write.
    vote->begin(m.rebalances);
    const auto old = maps.phy2log();
    try {
      rebalance_now(report, local, policy, old);
    } catch (const std::exception& e) {
      comm_suspect = true;  // every rank fails this rebalance, so every rank re-makes it next time
      vote->abort(e.what());
      vote->settle(m.rebalances);
      for (int l = 0; l < model.shape.layers; ++l) {
        const auto row = maps.phy2log(l);
        if (!std::equal(row.begin(), row.end(), old.row(static_cast<std::size_t>(l)).begin())) {
          publish_maps(l);
          ++m.layers_committed;
        }
      }
      throw;
    }
  }

  // The synchronous rebalance. The load sum carries whether any rank's communicator is suspect, so
  // every rank re-makes it in the same rebalance, under a generation every rank derives alike.
  void rebalance_now(step_report& report, const matrix<double>& local, policy_kind policy,
                     const matrix<expert_id>& old) {
    std::vector<double> values(local.flat().begin(), local.flat().end());
    values.push_back(std::exchange(comm_suspect, false) ? 1.0 : 0.0);
    auto summed = group->allreduce_sum(values);
    if (summed.back() > 0 && can_remake_comm) remake_comm(static_cast<int>(m.rebalances));
    summed.pop_back();
    matrix<double> total(local.rows(), local.cols());
    std::copy(summed.begin(), summed.end(), total.flat().begin());
    const auto next = rebalance(
        policy, {total, model.shape.num_physical, model.num_groups, model.num_nodes, model.shape.num_ranks, &old});
    m.plan_seconds = std::chrono::duration<double>(clock_type::now() - trigger_time).count();
    m.balancedness_before = balancedness(maps, total);
    // Layers are pipelined (transfers of one overlap the copies of its neighbours); a failure
    // leaves the layers before it committed on every rank and the rest untouched.
    for (const auto& st : mover->rearrange(weights, maps, next)) {
      m.bytes_moved += st.bytes_received;
      publish_maps(st.layer);
      ++m.layers_committed;
      ++report.layers_committed;
    }
    m.balancedness_after = balancedness(maps, total);
    m.rebalance_seconds = std::chrono::duration<double>(clock_type::now() - trigger_time).count();
    report.rebalance_finished = true;
  }

  // Starts the deferred background part once the previous one has ended. A previous one that does
  // not end in time is this rank's failure, returned so that commit_ready() posts it in the
  // agreement in this step like any other (throwing here would skip this step's round and put this
  // rank a round behind its peers).
  std::exception_ptr start_background_when_idle() {
    if (!deferred) return nullptr;
    if (background->busy()) {
      if (clock_type::now() - deferred_since <= 2 * cfg.timeout) return nullptr;
      return std::make_exception_ptr(error(
          errc::timeout,
          fmt::format("the previous rebalance did not end within {} ms of being abandoned", 2 * cfg.timeout.count())));
    }
    background->start(std::move(*deferred));
    deferred.reset();
    return nullptr;
  }

  void commit_ready(step_report& report) {
    if (failed_code) {
      // This rank's part failed; it keeps posting its code until the round that carries the first
      // failure (of any rank) comes back, which every rank reads in the same step. Rounds posted
      // before the failure still commit here as on the peers (their layers are staged on this rank
      // too), so every rank ends with the same maps.
      std::optional<std::int64_t> agreed;
      try {
        agreed = agree->step(*failed_code);
      } catch (...) {
        end_rebalance();  // the failure was reported when it happened; a silent peer ends it too
        ended_by_failure = true;
        return;
      }
      if (agreed && *agreed < 0) {
        end_rebalance();
        ended_by_failure = true;  // as on the peers, whose step throws: no new rebalance in this step
        return;
      }
      if (agreed && commits_after_failure) {
        try {
          commit_agreed(*agreed, report);
        } catch (...) {
          commits_after_failure = false;  // reported once; later rounds only post the code
          throw;
        }
      }
      return;
    }
    const auto start = clock_type::now();
    const auto late = start_background_when_idle();
    // Until it started, the background's state is the previous rebalance's.
    const auto failure = late ? late : deferred ? nullptr : background->failure();
    // A failed rank says so in the agreement (as -(rank + 2)) so its peers stop too.
    const std::int64_t mine = failure ? -(rank + 2) : deferred ? 0 : background->staged_layers();
    std::optional<std::int64_t> agreed;
    try {
      // Built in: the round of commit_lag_steps steps ago.
      agreed = agreement ? agreement(mine) : agree->step(mine);
    } catch (...) {
      abandon(mine);
      throw;
    }
    if (agreed && *agreed < 0) end_rebalance();  // every rank reads this round in this step
    if (failure) {
      // The peers commit this round's layers in this step: so does this rank (they were staged
      // before the failure), unless the round already carries a failure.
      std::exception_ptr commit_failure;
      if (agreed && *agreed >= 0) {
        try {
          commit_agreed(*agreed, report);
        } catch (...) {
          commit_failure = std::current_exception();
        }
      }
      abandon(mine);
      commits_after_failure = !commit_failure;
      try {
        std::rethrow_exception(failure);
      } catch (const error& e) {
        fail(e.code(), "rebalance failed on rank {}: {}{}", rank, e.what(),
             committed > 0 ? fmt::format(" ({} layers committed so far; up to {} more of those staged before the "
                                         "failure commit in the next steps, as on the other ranks)",
                                         committed, cfg.commit_lag_steps * max_commits_per_step)
                           : std::string());
      }
    }
    if (agreed && *agreed < 0) {
      abandon(mine);
      fail(errc::peer_failure, "rebalance failed on rank {}; layers not committed keep their old weights",
           -*agreed - 2);
    }
    if (pending_before == 0 && !deferred) {
      // The global load arrives with the policy, before any layer is staged: measure the old maps.
      if (const auto total = background->global_load()) pending_before = balancedness(maps, *total);
    }
    if (agreed) commit_agreed(*agreed, report);
    m.commit_host_seconds_max =
        std::max(m.commit_host_seconds_max, std::chrono::duration<double>(clock_type::now() - start).count());
    m.plan_seconds = background->plan_seconds();
    m.stage_seconds_per_layer = background->stage_seconds();
    if (committed == model.shape.layers) {
      in_flight = false;
      m.rebalance_in_flight = false;
      report.rebalance_finished = true;
      m.rebalance_seconds = std::chrono::duration<double>(clock_type::now() - trigger_time).count();
      m.balancedness_before = pending_before;
      if (const auto total = background->global_load()) m.balancedness_after = balancedness(maps, *total);
    }
  }

  // Commits the staged layers the agreement allows in this step (every rank reads the same round,
  // so every rank commits the same layers here).
  void commit_agreed(std::int64_t agreed, step_report& report) {
    const std::int64_t limit = std::min<std::int64_t>(agreed, committed + max_commits_per_step);
    for (; committed < limit; ++committed) {
      const auto ready = background->get(committed);
      serving.wait(ready.ready);
      mover->commit_layer(ready.staged, weights, background->area(ready.area), serving);
      // Released right after its reads are queued: publish_maps() may throw, and an area whose
      // reads were not recorded could be staged into again while they are still queued.
      background->release(ready.area, serving.record());
      maps.set_layer(committed, ready.staged.new_row);
      publish_maps(committed);
      m.bytes_moved += ready.staged.stats.bytes_received;
      ++m.layers_committed;
      ++report.layers_committed;
    }
  }

  // Stops this rank's part of the rebalance. Unless it already ended for everyone, it stays in
  // flight (posting `code`) until the agreement shows the failure to every rank in the same step,
  // so that all ranks end it, and start the next one, together.
  void abandon(std::int64_t code) {
    deferred.reset();
    if (background) background->cancel();  // it would wait forever for areas that are never committed
    comm_suspect = true;
    if (!in_flight) return;
    if (agreement) {
      end_rebalance();
    } else {
      failed_code = code < 0 ? code : -(rank + 2);
    }
  }
  void end_rebalance() {
    deferred.reset();
    in_flight = false;
    m.rebalance_in_flight = false;
    failed_code.reset();
  }
};

eplb_state::eplb_state(state_params params) {
  impl::validate(params);  // before impl's members take the params apart
  impl_ = std::make_unique<impl>(params);
}

eplb_state::~eplb_state() {
  stop();
}

std::int64_t* eplb_state::load_buffer() const noexcept {
  return reinterpret_cast<std::int64_t*>(impl_->load.data());
}

void eplb_state::record_load(int layer, std::span<const std::int64_t> counts) {
  const auto& shape = impl_->model.shape;
  if (layer < 0 || layer >= shape.layers) fail(errc::invalid_argument, "record_load: layer {} out of range", layer);
  if (counts.size() != static_cast<std::size_t>(shape.num_physical)) {
    fail(errc::invalid_argument, "record_load: {} counts for layer {}, expected one per physical slot ({})",
         counts.size(), layer, shape.num_physical);
  }
  auto* row = impl_->host_extra.data() + static_cast<std::size_t>(layer) * static_cast<std::size_t>(shape.num_physical);
  for (std::size_t i = 0; i < counts.size(); ++i) row[i] += counts[i];
}

step_report eplb_state::step(bool is_dummy) {
  auto& s = *impl_;
  if (s.stopped) fail(errc::cancelled, "eplb_state::step: the state was stopped");
  step_report report;
  try {
    s.drain_load(is_dummy);
    ++s.m.steps;
    ++s.since_rebalance;
    if (s.cfg.log_balancedness && s.m.steps % s.cfg.log_balancedness_interval == 0) s.log_balancedness();
    s.ended_by_failure = false;
    if (s.in_flight) s.commit_ready(report);
    if (!s.in_flight && !s.ended_by_failure && s.since_rebalance >= s.cfg.step_interval) {
      s.since_rebalance = 0;
      s.pending_before = 0;
      s.start_rebalance(report);
    }
  } catch (...) {
    if (s.in_flight && !s.failed_code) {
      // Tell the peers: the engine's agreement now; the built-in one from the next step on.
      if (s.agreement) {
        try {
          (void)s.agreement(-(s.rank + 2));
        } catch (...) {  // NOLINT(bugprone-empty-catch): the original error is what this rank reports
        }
      }
      s.abandon(-(s.rank + 2));
      s.commits_after_failure = false;  // a commit or the agreement itself failed here
    }
    throw;
  }
  return report;
}

void eplb_state::stop() noexcept {
  if (!impl_ || impl_->stopped) return;
  impl_->stopped = true;
  // Mid-rebalance, the peers read this rank's failure code from the agreement instead of waiting
  // for rounds it would never post.
  if (impl_->in_flight && impl_->agree) impl_->agree->fail_out(impl_->failed_code.value_or(-(impl_->rank + 2)));
  if (impl_->background) impl_->background->stop();
  try {
    impl_->serving.synchronize(impl_->cfg.timeout);
  } catch (...) {
    // stop() must not throw; a failed serving stream is the engine's to report.
  }
}

const placement& eplb_state::maps() const noexcept {
  return impl_->maps;
}
const std::int32_t* eplb_state::device_phy2log() const noexcept {
  return reinterpret_cast<const std::int32_t*>(impl_->dev_phy2log.data());
}
const std::int32_t* eplb_state::device_log2phy() const noexcept {
  return reinterpret_cast<const std::int32_t*>(impl_->dev_log2phy.data());
}
const std::int32_t* eplb_state::device_replica_count() const noexcept {
  return reinterpret_cast<const std::int32_t*>(impl_->dev_counts.data());
}
int eplb_state::device_max_replicas() const noexcept {
  return impl_->max_rep;
}
const metrics& eplb_state::stats() const noexcept {
  return impl_->m;
}
comm::backend eplb_state::communicator_kind() const noexcept {
  return impl_->comm_kind;
}

}  // namespace eplb

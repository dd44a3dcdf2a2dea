#include "comm/mailbox/mailbox_transport.hpp"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <thread>

#include "comm/host_identity.hpp"
#include "comm/mailbox/control_block.hpp"
#include "comm/mailbox/pair_protocol.hpp"
#include "comm/rank_record.hpp"
#include "device/event_state.hpp"
#include "util/fail.hpp"
#include "util/job_thread.hpp"
#include "util/thread_priority.hpp"

namespace eplb::comm {
namespace {

using clock = mailbox_clock;

constexpr int max_ranks = 256;
// Fields of a rank's record, after its identity.
constexpr std::size_t field_ordinal = 0;
constexpr std::size_t field_handle = 1;
constexpr std::size_t field_layout = 2;

class mailbox_transport final : public transport {
 public:
  mailbox_transport(const setup& s, std::unique_ptr<mailbox_memory> memory);
  ~mailbox_transport() override;

  backend kind() const noexcept override { return memory_->kind(); }
  capabilities caps() const noexcept override {
    return {.host_complete = true, .background_safe = true, .crosses_nodes = false, .device_memory = true};
  }
  void run(std::span<const op> ops) override { await(enqueue(ops)); }
  device::event enqueue(std::span<const op> ops) override;
  void await(const device::event& e) override;

 private:
  const char* name() const noexcept { return memory_->name(); }
  void validate(const setup& s) const;
  void connect();
  void check_records(const rank_record& mine) const;
  int ordinal_of(int r) const;
  void run_batch(std::span<const op> ops, cudaEvent_t start, cudaStream_t caller);
  void drive(pair_batch& batch);
  bool advance(pair_batch& batch, bool& done);
  void back_off(int idle_rounds) const;
  void check_peers(const pair_batch& batch, clock::time_point now, bool liveness) const;
  void break_with(const std::string& why) noexcept;

  options opts_;
  int ordinal_ = 0;
  std::shared_ptr<store> store_;
  mailbox_geometry geometry_;
  std::vector<rank_record> records_;  // every rank's, by rank
  bool pid_checks_ = false;           // every rank shares our PID namespace: peers' pids mean something
  // Destroyed in reverse: the mailboxes first, then the copy lanes, then the control block.
  std::unique_ptr<control_block> control_;
  std::unique_ptr<pair_protocol> pairs_;
  std::unique_ptr<mailbox_memory> memory_;
  std::atomic<bool> broken_{false};
  std::string broken_reason_;               // written before broken_ is published, never after
  std::atomic<std::uint64_t> progress_{0};  // hand-offs seen by the batch thread
  std::unique_ptr<job_thread> batches_ = std::make_unique<job_thread>();  // last: goes first
};

mailbox_transport::mailbox_transport(const setup& s, std::unique_ptr<mailbox_memory> memory)
    : transport(s.rank, s.size), opts_(s.opts), memory_(std::move(memory)) {
  validate(s);
  ordinal_ = s.dev->ordinal();
  device::cuda::use_device(ordinal_);
  store_ = s.rendezvous;
  batches_->post([nice = opts_.nice] { lower_thread_priority(nice); });
  geometry_ = mailbox_geometry::of(opts_, size(), name());
  if (size() > 1) memory_->allocate(geometry_.mailbox_bytes());
  connect();
}

void mailbox_transport::validate(const setup& s) const {
  if (s.dev == nullptr || s.dev->kind() != device::backend_kind::cuda) {
    fail(errc::invalid_argument, "{}: setup.dev must be a CUDA device", name());
  }
  if (!s.rendezvous) fail(errc::invalid_argument, "{}: setup.rendezvous (a store) is missing", name());
  if (size() > max_ranks) fail(errc::invalid_argument, "{}: at most {} ranks, got {}", name(), max_ranks, size());
  if (opts_.chunk_bytes == 0) fail(errc::invalid_argument, "{}: chunk_bytes must be > 0", name());
  if (opts_.nice < 0 || opts_.nice > 19) {
    fail(errc::invalid_argument, "{}: nice must be in 0..19, got {}", name(), opts_.nice);
  }
  if (!(opts_.cuda_ipc_max_gbps >= 0)) {
    fail(errc::invalid_argument, "{}: cuda_ipc_max_gbps must be >= 0 (0 = no cap), got {}", name(),
         opts_.cuda_ipc_max_gbps);
  }
  if (opts_.lanes < 0 || opts_.lanes > 64) {
    fail(errc::invalid_argument, "{}: lanes must be in 0..64 (0 = one copy stream per peer), got {}", name(),
         opts_.lanes);
  }
}

mailbox_transport::~mailbox_transport() {
  batches_.reset();  // runs what is queued (each batch ends by its timeouts), then joins
  (void)cudaSetDevice(ordinal_);
  // A copy that outlived the wait may still touch our mailbox: it is kept for good rather than
  // freed under that copy (and cudaFree would wait for it).
  if (pairs_ && !pairs_->settle(opts_.timeout)) memory_->keep_for_good();
}

// ---- start-up ----------------------------------------------------------------------------------

void mailbox_transport::connect() {
  const auto layout = fmt::format("staging_bytes {}, chunk_bytes {}, {}, {} mailbox", opts_.staging_bytes,
                                  opts_.chunk_bytes, opts_.cuda_ipc_pull ? "pull" : "push", memory_->where());
  const rank_record mine{this_process(), {std::to_string(ordinal_), memory_->handle(), layout}};
  records_ = exchange_records(*store_, "cuda_ipc/rank/", rank(), size(), mine, opts_.timeout, name());
  check_records(mine);
  pid_checks_ = std::all_of(records_.begin(), records_.end(),
                            [&](const rank_record& r) { return r.where.pid_ns == mine.where.pid_ns; });
  control_ = std::make_unique<control_block>(*store_, rank(), size(), opts_.timeout, name());
  for (int r = 0; r < size(); ++r) {
    if (r != rank()) memory_->map_peer(r, records_[static_cast<std::size_t>(r)].fields[field_handle], ordinal_of(r));
  }
  pairs_ = std::make_unique<pair_protocol>(rank(), size(), opts_, geometry_, *control_, *memory_);
  // Everyone has mapped everything before the names of the control block and mailboxes disappear.
  store_barrier(*store_, "cuda_ipc/ready", size(), opts_.timeout);
  control_->unlink();
  memory_->all_mapped();
}

void mailbox_transport::check_records(const rank_record& mine) const {
  for (int r = 0; r < size(); ++r) {
    const auto& other = records_[static_cast<std::size_t>(r)];
    if (!same_host(other.where, mine.where)) {
      fail(errc::invalid_config,
           "{}: rank {} runs on host {} and rank {} on host {}: cuda_ipc connects the GPUs of one node "
           "(use nccl or gloo across nodes)",
           name(), rank(), mine.where.host, r, other.where.host);
    }
    if (other.fields[field_layout] != mine.fields[field_layout]) {
      fail(errc::invalid_argument, "{}: rank {} uses {}, rank {} uses {}; every rank must pass the same", name(),
           rank(), mine.fields[field_layout], r, other.fields[field_layout]);
    }
    if (r != rank() && same_process(other.where, mine.where)) {
      fail(errc::invalid_config, "{}: ranks {} and {} are threads of one process; cuda_ipc needs one process per GPU",
           name(), rank(), r);
    }
  }
}

int mailbox_transport::ordinal_of(int r) const {
  const auto& text = records_[static_cast<std::size_t>(r)].fields[field_ordinal];
  int v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size()) {
    fail(errc::transport, "{}: the store entry of rank {} is malformed", name(), r);
  }
  return v;
}

// ---- batches -----------------------------------------------------------------------------------

// Queues the batch on the batch thread; the returned event completes (or fails) with it. Our
// copies start after the work already queued on the caller's stream, so that point is marked now.
device::event mailbox_transport::enqueue(std::span<const op> ops) {
  if (broken_.load(std::memory_order_acquire)) {
    fail(errc::transport, "{} rank {}: broken by an earlier failure ({}); create a new communicator", name(), rank(),
         broken_reason_);
  }
  device::cuda::use_device(ordinal_);
  std::shared_ptr<device::cuda::event_handle> start;
  cudaStream_t caller = nullptr;
  if (stream() != nullptr) {
    caller = static_cast<cudaStream_t>(stream()->native_handle());
    start = std::make_shared<device::cuda::event_handle>();
    start->record(caller);
  }
  auto done = std::make_shared<device::detail::event_state>();
  batches_->post([this, batch = std::vector<op>(ops.begin(), ops.end()), start, caller, done]() mutable {
    std::exception_ptr failure;
    try {
      if (broken_.load(std::memory_order_acquire)) {
        fail(errc::transport, "{} rank {}: broken by an earlier failure ({})", name(), rank(), broken_reason_);
      }
      run_batch(batch, start ? start->get() : nullptr, caller);
    } catch (const error& e) {
      break_with(e.what());
      failure = std::current_exception();
    } catch (...) {
      break_with("unexpected exception");
      failure = std::current_exception();
    }
    start.reset();
    done->complete(failure);
  });
  return device::event(done);
}

// Waits for a submitted batch. The batch ends by itself (its own timeouts); this bound only
// guards against a batch thread that stopped making progress without noticing.
void mailbox_transport::await(const device::event& e) {
  auto seen = progress_.load(std::memory_order_relaxed);
  auto last = clock::now();
  while (!e.wait_for(std::chrono::microseconds(500))) {
    const auto now_seen = progress_.load(std::memory_order_relaxed);
    if (now_seen != seen) {
      seen = now_seen;
      last = clock::now();
    } else if (clock::now() - last > 2 * opts_.timeout) {
      fail(errc::timeout, "{} rank {}: the batch made no progress for {} ms", name(), rank(),
           2 * opts_.timeout.count());
    }
  }
}

// A failed batch may leave copies queued on our lanes (a stalled GPU outlives settle()): the
// caller's stream is ordered after them, so buffers it frees after an event on that stream (as
// every eplb caller does: device::release_after) are not freed under a copy still reading or
// writing them.
void mailbox_transport::run_batch(std::span<const op> ops, cudaEvent_t start, cudaStream_t caller) {
  device::cuda::use_device(ordinal_);
  pair_batch batch;
  pairs_->open(ops, batch);
  pairs_->wait_for(start, batch);
  try {
    drive(batch);
  } catch (...) {
    // Ordering the caller's stream costs no wait; without a stream, wait (bounded) as well.
    const bool fenced = caller != nullptr && pairs_->fence(caller);
    if (!fenced && !pairs_->settle(opts_.timeout)) (void)pairs_->fence(caller);
    throw;
  }
  pairs_->close(batch);
}

void mailbox_transport::drive(pair_batch& batch) {
  int idle_rounds = 0;
  auto next_liveness = clock::now();
  for (;;) {
    bool done = false;
    const bool progress = advance(batch, done);
    if (done) return;
    const auto now = clock::now();
    if (progress) {
      progress_.fetch_add(1, std::memory_order_relaxed);
      idle_rounds = 0;
      continue;
    }
    check_peers(batch, now, now >= next_liveness);
    if (now >= next_liveness) next_liveness = now + std::chrono::milliseconds(5);
    back_off(++idle_rounds);
  }
}

// One pass over the batch; true when anything moved, `done` once every stream finished. A send
// issues its copies once every earlier one in shift order has issued all of its own.
bool mailbox_transport::advance(pair_batch& batch, bool& done) {
  bool progress = false;
  done = true;
  bool earlier_issued = true;
  for (auto* st : batch.active_sends) {
    progress |= pairs_->advance_send(*st, earlier_issued);
    earlier_issued &= st->issued == st->chunks;
    done &= st->finished();
  }
  for (auto* st : batch.active_recvs) {
    progress |= pairs_->advance_recv(*st);
    done &= st->finished();
  }
  return progress;
}

// Spin briefly (a chunk takes tens of microseconds), then back off. With `nice` (async mode) poll
// about once per 16 MiB chunk instead: measured on 4 H200, that gave up ~6% of exchange speed for
// less serving-step inflation, because spinning on the driver delays the serving thread's launches.
void mailbox_transport::back_off(int idle_rounds) const {
  if (opts_.nice > 0) {
    if (idle_rounds < 4) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(idle_rounds < 2000 ? 20 : 200));
    }
  } else if (idle_rounds < 64) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(idle_rounds < 1024 ? 5 : 100));
  }
}

// A peer that flagged a failure or exited is errc::peer_failure, one silent for the timeout errc::timeout.
void mailbox_transport::check_peers(const pair_batch& batch, clock::time_point now, bool liveness) const {
  for (const auto* list : {&batch.active_sends, &batch.active_recvs}) {
    for (const auto* st : *list) {
      if (st->finished()) continue;
      const int p = st->peer;
      if (auto why = control_->failure(p)) {
        fail(errc::peer_failure, "{} rank {}: rank {} failed: {}", name(), rank(), p, *why);
      }
      const auto pid = records_[static_cast<std::size_t>(p)].where.pid;
      if (liveness && pid_checks_ && !process_alive(pid)) {
        fail(errc::peer_failure, "{} rank {}: rank {} (pid {}) exited", name(), rank(), p, pid);
      }
      if (now - st->last_progress > opts_.timeout) {
        fail(errc::timeout, "{} rank {}: no progress with rank {} for {} ms ({} {}/{} chunks, manifest {})", name(),
             rank(), p, opts_.timeout.count(), list == &batch.active_sends ? "sent" : "received", st->completed,
             st->chunks, st->manifest_done ? "exchanged" : "pending");
      }
    }
  }
}

void mailbox_transport::break_with(const std::string& why) noexcept {
  if (broken_.load(std::memory_order_acquire)) return;
  broken_reason_ = why;  // written before the flag is published, never after
  broken_.store(true, std::memory_order_release);
  if (control_) control_->publish_failure(rank(), why);
}

}  // namespace

std::unique_ptr<transport> make_mailbox_transport(const setup& s, std::unique_ptr<mailbox_memory> memory) {
  return std::make_unique<mailbox_transport>(s, std::move(memory));
}

}  // namespace eplb::comm

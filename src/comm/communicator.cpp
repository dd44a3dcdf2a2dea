#include "eplb/comm/communicator.hpp"

#include <condition_variable>
#include <mutex>

#include "comm/transport.hpp"
#include "util/fail.hpp"
#include "util/job_thread.hpp"

namespace eplb::comm {

std::string_view to_string(backend b) noexcept {
  switch (b) {
    case backend::loopback:
      return "loopback";
    case backend::gloo:
      return "gloo";
    case backend::nccl:
      return "nccl";
    case backend::stateless_nccl:
      return "stateless_nccl";
    case backend::cuda_ipc:
      return "cuda_ipc";
  }
  return "unknown";
}

backend parse_backend(std::string_view name) {
  for (auto b : {backend::loopback, backend::gloo, backend::nccl, backend::stateless_nccl, backend::cuda_ipc}) {
    if (name == to_string(b)) return b;
  }
  fail(errc::invalid_argument,
       "communicator: unknown backend \"{}\" (allowed: loopback, gloo, nccl, stateless_nccl, cuda_ipc)", name);
}

transport::transport(int rank, int size) : rank_(rank), size_(size) {
  if (size <= 0) fail(errc::invalid_argument, "communicator: size must be > 0, got {}", size);
  if (rank < 0 || rank >= size)
    fail(errc::invalid_argument, "communicator: rank {} out of range 0..{}", rank, size - 1);
}

device::event transport::enqueue(std::span<const op> ops) {
  run(ops);
  return {};  // complete: run() returned with every byte in place
}

void transport::await(const device::event&) {
  fail(errc::internal, "communicator rank {}: a backend returned an event from enqueue() but cannot await it", rank_);
}

void transport::abort(std::string_view why) noexcept {
  if (aborting_.exchange(true)) return;
  try {
    abort_reason_ = why;
  } catch (...) {  // NOLINT(bugprone-empty-catch): out of memory for the reason; the flag still counts
  }
  aborted_.store(true, std::memory_order_release);
  on_abort(abort_reason_);
}

std::string transport::abort_reason() const {
  return abort_requested() ? abort_reason_ : std::string();
}

void transport::on_abort(const std::string& /*why*/) noexcept {}

registration transport::register_memory(std::span<std::byte>) {
  return {};
}

device::memory_use transport::reserve_memory() {
  return {};
}

registered_memory transport::allocate_registered(std::size_t) {
  return {};
}

// Runs execute_async() jobs in order, so a caller's thread never blocks on the network: on the
// owner's executor when one was set, else on a thread of its own made on first use. Destroying it
// runs what is queued and waits for every job it gave the owner's executor.
struct communicator::worker {
  executor owner;
  std::unique_ptr<job_thread> own;
  std::mutex mutex;
  std::condition_variable finished;
  std::size_t outstanding = 0;  // jobs given to `owner` and not finished yet
  bool started = false;         // a job was given: the executor may no longer change

  void run(std::function<void()> job) {
    started = true;
    if (!owner) {
      if (!own) own = std::make_unique<job_thread>();
      own->post(std::move(job));
      return;
    }
    {
      std::lock_guard lock(mutex);
      ++outstanding;
    }
    try {
      owner([this, job = std::move(job)] {
        job();
        std::lock_guard lock(mutex);
        --outstanding;
        finished.notify_all();  // under the lock: the destructor cannot return before it is done
      });
    } catch (...) {
      std::lock_guard lock(mutex);
      --outstanding;
      throw;
    }
  }

  ~worker() {
    own.reset();
    std::unique_lock lock(mutex);
    finished.wait(lock, [&] { return outstanding == 0; });
  }
};

communicator::communicator(std::unique_ptr<transport> t) : transport_(std::move(t)) {
  if (!transport_) fail(errc::internal, "communicator: made without a transport");
}

communicator::~communicator() {
  worker_.reset();  // runs the queued batches while the transport still exists
}

int communicator::rank() const noexcept {
  return transport_->rank();
}
int communicator::size() const noexcept {
  return transport_->size();
}
backend communicator::kind() const noexcept {
  return transport_->kind();
}
capabilities communicator::caps() const noexcept {
  return transport_->caps();
}
std::size_t communicator::pending() const noexcept {
  return ops_.size();
}
void communicator::discard_pending() noexcept {
  ops_.clear();
}
void communicator::set_stream(device::stream* s) noexcept {
  transport_->set_stream(s);
}
device::stream* communicator::stream() const noexcept {
  return transport_->stream();
}

void communicator::check_peer(int peer, const char* what) const {
  if (peer < 0 || peer >= size()) {
    fail(errc::invalid_argument, "{}: peer {} is out of range for {} ranks (rank {})", what, peer, size(), rank());
  }
  if (peer == rank()) fail(errc::invalid_argument, "{}: rank {} cannot exchange with itself", what, rank());
}

void communicator::add_send(std::span<const std::byte> data, int peer) {
  check_peer(peer, "add_send");
  // The transport only reads through this pointer.
  ops_.push_back({true, const_cast<std::byte*>(data.data()), data.size(), peer});
}

void communicator::add_recv(std::span<std::byte> data, int peer) {
  check_peer(peer, "add_recv");
  ops_.push_back({false, data.data(), data.size(), peer});
}

void communicator::abort(std::string_view why) noexcept {
  transport_->abort(why);
}

bool communicator::aborted() const noexcept {
  return transport_->abort_requested();
}

void communicator::check_not_aborted() const {
  if (transport_->abort_requested()) {
    fail(errc::cancelled, "communicator rank {}: aborted ({})", rank(), transport_->abort_reason());
  }
}

void communicator::execute() {
  check_not_aborted();
  std::vector<op> batch;
  batch.swap(ops_);
  if (batch.empty()) return;
  transport_->run(batch);
}

device::event communicator::submit() {
  check_not_aborted();
  std::vector<op> batch;
  batch.swap(ops_);
  if (batch.empty()) return {};
  return transport_->enqueue(batch);
}

void communicator::wait(const device::event& submitted) {
  if (submitted.valid()) transport_->await(submitted);
}

registration communicator::register_memory(std::span<std::byte> region) {
  return transport_->register_memory(region);
}

registered_memory communicator::allocate_registered(std::size_t bytes) {
  return transport_->allocate_registered(bytes);
}

device::memory_use communicator::reserve_memory() {
  return transport_->reserve_memory();
}

void communicator::set_executor(executor run) {
  if (worker_ && worker_->started) {
    fail(errc::invalid_argument, "communicator rank {}: set_executor() after execute_async(): batches would reorder",
         rank());
  }
  if (!worker_) worker_ = std::make_unique<worker>();
  worker_->owner = std::move(run);
}

void communicator::execute_async(std::function<void(std::exception_ptr)> done) {
  if (!worker_) worker_ = std::make_unique<worker>();
  auto batch = std::make_shared<std::vector<op>>();
  batch->swap(ops_);
  worker_->run([t = transport_.get(), batch, done = std::move(done)] {
    std::exception_ptr failure;
    try {
      if (t->abort_requested())
        fail(errc::cancelled, "communicator rank {}: aborted ({})", t->rank(), t->abort_reason());
      if (!batch->empty()) t->run(*batch);
      if (t->caps().stream_ordered && t->stream() != nullptr) {
        t->stream()->record().notify(done);
        return;
      }
    } catch (...) {
      failure = std::current_exception();
    }
    done(failure);
  });
}

}  // namespace eplb::comm

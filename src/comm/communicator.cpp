#include "eplb/comm/communicator.hpp"

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

// One thread per communicator runs execute_async() batches in order, so a caller's thread never
// blocks on the network.
struct communicator::worker : job_thread {};

communicator::communicator(int rank, int size) : rank_(rank), size_(size) {
  if (size <= 0) fail(errc::invalid_argument, "communicator: size must be > 0, got {}", size);
  if (rank < 0 || rank >= size)
    fail(errc::invalid_argument, "communicator: rank {} out of range 0..{}", rank, size - 1);
}

communicator::~communicator() = default;

void communicator::finish_async() noexcept {
  worker_.reset();
}

void communicator::check_peer(int peer, const char* what) const {
  if (peer < 0 || peer >= size_) {
    fail(errc::invalid_argument, "{}: peer {} is out of range for {} ranks (rank {})", what, peer, size_, rank_);
  }
  if (peer == rank_) fail(errc::invalid_argument, "{}: rank {} cannot exchange with itself", what, rank_);
}

void communicator::add_send(std::span<const std::byte> data, int peer) {
  check_peer(peer, "add_send");
  // The backend only reads through this pointer.
  ops_.push_back({true, const_cast<std::byte*>(data.data()), data.size(), peer});
}

void communicator::add_recv(std::span<std::byte> data, int peer) {
  check_peer(peer, "add_recv");
  ops_.push_back({false, data.data(), data.size(), peer});
}

void communicator::execute() {
  std::vector<op> batch;
  batch.swap(ops_);
  if (batch.empty()) return;
  run(batch);
}

device::event communicator::submit() {
  std::vector<op> batch;
  batch.swap(ops_);
  if (batch.empty()) return {};
  return enqueue(batch);
}

void communicator::wait(const device::event& submitted) {
  if (submitted.valid()) await(submitted);
}

registration communicator::register_memory(std::span<std::byte>) {
  return {};
}
registered_memory communicator::allocate_registered(std::size_t) {
  return {};
}

device::event communicator::enqueue(std::span<const op> ops) {
  run(ops);
  return {};  // complete: run() returned with every byte in place
}

void communicator::await(const device::event&) {
  fail(errc::internal, "communicator rank {}: a backend returned an event from enqueue() but cannot await it", rank_);
}

void communicator::execute_async(std::function<void(std::exception_ptr)> done) {
  if (!worker_) worker_ = std::make_unique<worker>();
  auto batch = std::make_shared<std::vector<op>>();
  batch->swap(ops_);
  worker_->post([this, batch, done = std::move(done)] {
    std::exception_ptr failure;
    try {
      if (!batch->empty()) run(*batch);
      if (caps().stream_ordered && stream_ != nullptr) {
        stream_->record().notify(done);
        return;
      }
    } catch (...) {
      failure = std::current_exception();
    }
    done(failure);
  });
}

}  // namespace eplb::comm

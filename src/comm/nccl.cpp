// NCCL: every execute() is one ncclGroupStart/End of ncclSend/ncclRecv on the stream given by
// set_stream(). Communicators are non-blocking (config.blocking = 0) so that creation and transfers
// can be polled with a deadline: a peer that never arrives, dies or stalls is reported, after which
// the communicator is aborted (ncclCommAbort) so no kernel is left spinning. The stateless flavour
// always creates its own ncclComm from a unique id exchanged through the store, independent of any
// framework group; a new rank set (elastic EP) is a new communicator under a new store prefix.
#include <cuda_runtime_api.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "comm/backends.hpp"
#include "comm/nccl_library.hpp"
#include "device/cuda_check.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::comm {
namespace {

using clock = std::chrono::steady_clock;

void free_nccl_memory(std::byte* p, int ordinal) noexcept {
  (void)cudaSetDevice(ordinal);
  (void)nccl().MemFree(p);  // loaded before any memory was allocated from it
}

class nccl_transport final : public transport {
 public:
  nccl_transport(const setup& s, bool stateless) : transport(s.rank, s.size), opts_(s.opts), stateless_(stateless) {
    if (s.dev == nullptr || s.dev->kind() != device::backend_kind::cuda) {
      fail(errc::invalid_argument, "{}: setup.dev must be a CUDA device", name());
    }
    ordinal_ = s.dev->ordinal();
    device::cuda::use_device(ordinal_);
    if (!stateless && s.external_nccl_comm != nullptr) {
      adopt(static_cast<ncclComm_t>(s.external_nccl_comm));
      return;
    }
    if (!s.rendezvous) fail(errc::invalid_argument, "{}: setup.rendezvous (a store) is missing", name());
    ncclUniqueId id{};
    const std::string key = "nccl-unique-id";
    if (rank() == 0) {
      check(api_.GetUniqueId(&id), "ncclGetUniqueId");
      s.rendezvous->set(key, std::string(reinterpret_cast<const char*>(&id), sizeof id));
    } else {
      const auto v = s.rendezvous->get(key, opts_.timeout);
      if (v.size() != sizeof id) fail(errc::transport, "{}: unique id in the store has {} bytes", name(), v.size());
      std::memcpy(&id, v.data(), sizeof id);
    }
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t r = api_.CommInitRankConfig(&comm_, size(), id, rank(), &config);
    if (r != ncclSuccess && r != ncclInProgress) check(r, "ncclCommInitRankConfig");
    await_comm(deadline_after(opts_.timeout), "joining the communicator (a rank never arrived?)");
  }

  ~nccl_transport() override {
    if (!owned_ || comm_ == nullptr) return;
    (void)cudaSetDevice(ordinal_);
    // Finalize flushes outstanding work; a peer that is gone can keep it pending, so bound the
    // wait and abort instead of hanging in a destructor.
    ncclResult_t state = api_.CommFinalize(comm_);
    const auto deadline = deadline_after(opts_.timeout);
    while (state == ncclInProgress && clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(500));
      if (api_.CommGetAsyncError(comm_, &state) != ncclSuccess) break;
    }
    if (state == ncclSuccess) {
      (void)api_.CommDestroy(comm_);
    } else {
      (void)api_.CommAbort(comm_);
    }
  }

  backend kind() const noexcept override { return stateless_ ? backend::stateless_nccl : backend::nccl; }

  // NCCL decides per transfer whether a registered buffer can be used (peer reachable by CUDA IPC,
  // memory exportable); otherwise it falls back to its own buffers.
  registration register_memory(std::span<std::byte> region) override {
    if (region.empty()) return {};
    check_alive();
    device::cuda::use_device(ordinal_);
    void* handle = nullptr;
    check(api_.CommRegister(comm_, region.data(), region.size(), &handle), "ncclCommRegister");
    if (handle == nullptr) return {};  // registration is off in this NCCL (NCCL_LOCAL_REGISTER=0)
    return registration([this, handle] {
      if (comm_ == nullptr) return;  // an aborted communicator freed its registrations already
      (void)cudaSetDevice(ordinal_);
      (void)api_.CommDeregister(comm_, handle);
    });
  }

  registered_memory allocate_registered(std::size_t bytes) override {
    if (bytes == 0) return {};
    device::cuda::use_device(ordinal_);
    void* p = nullptr;
    check(api_.MemAlloc(&p, bytes), "ncclMemAlloc");
    device::buffer memory(static_cast<std::byte*>(p), bytes, device::memory_kind::device, ordinal_, &free_nccl_memory);
    auto reg = register_memory(memory.span());
    return {std::move(memory), std::move(reg)};
  }
  capabilities caps() const noexcept override {
    return {.stream_ordered = true, .host_complete = true, .crosses_nodes = true, .device_memory = true};
  }

  void run(std::span<const op> ops) override { await(enqueue(ops)); }

  device::event enqueue(std::span<const op> ops) override {
    check_alive();
    if (stream() == nullptr) fail(errc::invalid_argument, "{}: set_stream() must be called before execute()", name());
    device::cuda::use_device(ordinal_);
    auto* s = static_cast<cudaStream_t>(stream()->native_handle());
    peers_.clear();
    for (const auto& o : ops) {
      if (std::find(peers_.begin(), peers_.end(), o.peer) == peers_.end()) peers_.push_back(o.peer);
    }
    check(api_.GroupStart(), "ncclGroupStart");
    for (const auto& o : ops) {
      const ncclResult_t r = o.is_send ? api_.Send(o.data, o.bytes, ncclUint8, o.peer, comm_, s)
                                       : api_.Recv(o.data, o.bytes, ncclUint8, o.peer, comm_, s);
      if (r != ncclSuccess && r != ncclInProgress) {
        (void)api_.GroupEnd();
        check(r, o.is_send ? "ncclSend" : "ncclRecv");
      }
    }
    const ncclResult_t end = api_.GroupEnd();
    if (end != ncclSuccess && end != ncclInProgress) check(end, "ncclGroupEnd");
    // Enqueueing can wait on peers too (connecting, exchanging registered buffers' handles).
    await_comm(deadline_after(opts_.timeout), "enqueueing the batch", true);
    return stream()->record();
  }

  // Waits for the transfers, polling NCCL's asynchronous errors between short slices so that a
  // dead peer surfaces; the event wakes the wait as soon as the stream passes it.
  void await(const device::event& done) override {
    const auto deadline = deadline_after(opts_.timeout);
    while (!done.wait_for(std::chrono::microseconds(200))) {
      if (aborted_) fail(errc::transport, "{} rank {}: communicator was aborted", name(), rank());
      ncclResult_t async = ncclSuccess;
      check(api_.CommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
      if (async != ncclSuccess && async != ncclInProgress)
        abort_with(errc::peer_failure, fmt::format("asynchronous NCCL error: {}", api_.GetErrorString(async)));
      if (clock::now() >= deadline) {
        abort_with(errc::timeout, fmt::format("transfers with peers {} did not finish within {} ms",
                                              fmt::join(peers_, ","), opts_.timeout.count()));
      }
    }
  }

 private:
  const char* name() const { return stateless_ ? "stateless_nccl" : "nccl"; }

  // The engine's communicator works only with the NCCL copy that made it. With two copies in the
  // process nothing tells which one that was, so the user must name it; a communicator the loaded
  // copy does not recognise (another version's layout) fails its first query.
  void adopt(ncclComm_t c) {
    if (api_.loaded.size() > 1 && std::getenv("EPLB_NCCL_LIBRARY") == nullptr) {
      fail(
          errc::invalid_argument,
          "nccl: setup.external_nccl_comm: this process holds {} NCCL libraries ({}); set EPLB_NCCL_LIBRARY to the one "
          "that made the communicator",
          api_.loaded.size(), fmt::join(api_.loaded, ", "));
    }
    int n = 0, r = 0;
    if (api_.CommCount(c, &n) != ncclSuccess || api_.CommUserRank(c, &r) != ncclSuccess) {
      fail(errc::invalid_argument,
           "nccl: setup.external_nccl_comm is not a communicator of the loaded NCCL {} ({}); was it made by another "
           "NCCL? (set EPLB_NCCL_LIBRARY)",
           api_.path, api_.version);
    }
    if (n != size() || r != rank()) {
      fail(errc::invalid_argument, "nccl: the external communicator is rank {} of {}, setup says {} of {}", r, n,
           rank(), size());
    }
    comm_ = c;
    owned_ = false;
  }

  void check_alive() const {
    if (aborted_)
      fail(errc::transport, "{} rank {}: communicator was aborted after an earlier failure", name(), rank());
  }

  void check(ncclResult_t r, const char* what) {
    if (r == ncclSuccess) return;
    fail(errc::transport, "{} rank {}: {} failed: {} ({})", name(), rank(), what, api_.GetErrorString(r),
         api_.GetLastError(comm_));
  }

  // `with_peers`: the wait is on the last batch's peers, named in the error.
  void await_comm(clock::time_point deadline, const char* what, bool with_peers = false) {
    const auto doing = [&] {
      return with_peers ? fmt::format("{} with peers {}", what, fmt::join(peers_, ",")) : std::string(what);
    };
    for (;;) {
      ncclResult_t state = ncclSuccess;
      check(api_.CommGetAsyncError(comm_, &state), "ncclCommGetAsyncError");
      if (state == ncclSuccess) return;
      if (state != ncclInProgress)
        abort_with(errc::peer_failure, fmt::format("{}: {}", doing(), api_.GetErrorString(state)));
      if (clock::now() >= deadline)
        abort_with(errc::timeout, fmt::format("{}: not done within {} ms", doing(), opts_.timeout.count()));
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  [[noreturn]] void abort_with(errc code, const std::string& why) {
    if (!aborted_ && comm_ != nullptr) {
      aborted_ = true;
      (void)api_.CommAbort(comm_);  // frees the communicator; the engine must rebuild one it lent us
      comm_ = nullptr;
    }
    fail(code, "{} rank {}: {}; communicator aborted", name(), rank(), why);
  }

  const nccl_library& api_ = nccl();  // first: every other member's use goes through it
  options opts_;
  bool stateless_;
  int ordinal_ = 0;
  ncclComm_t comm_ = nullptr;
  std::vector<int> peers_;  // of the last batch, for error messages
  bool owned_ = true;
  bool aborted_ = false;
};

}  // namespace

int nccl_runtime_version() noexcept {
  return nccl_unavailable_reason().empty() ? nccl().version : 0;
}

std::unique_ptr<transport> make_nccl(const setup& s, bool stateless) {
  return std::make_unique<nccl_transport>(s, stateless);
}

}  // namespace eplb::comm

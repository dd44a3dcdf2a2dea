// Point-to-point exchange of raw bytes between the ranks of an EP group: queue sends and receives,
// then execute() them as one batch. Peers are EP-group ranks. Between any two ranks, sends and
// receives match in the order they were added; sizes must agree. Backends: loopback (threads),
// gloo (TCP, staged through pinned host memory), nccl and stateless_nccl (GPU only), cuda_ipc (GPUs
// of one node, one process each: copy engines over NVLink, no NCCL).
#pragma once

#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "eplb/comm/store.hpp"
#include "eplb/device/device.hpp"
#include "eplb/export.hpp"

namespace eplb::comm {

enum class backend { loopback, gloo, nccl, stateless_nccl, cuda_ipc };

[[nodiscard]] EPLB_API std::string_view to_string(backend b) noexcept;
/// Parses a backend name; error(errc::invalid_argument) listing the known names otherwise.
[[nodiscard]] EPLB_API backend parse_backend(std::string_view name);

/// What a backend promises; the runtime and the config decide from these, never from names.
struct capabilities {
  bool stream_ordered = false;   ///< execute() only enqueues; data is in place in stream order
  bool host_complete = false;    ///< execute() returns once every byte is in place
  bool background_safe = false;  ///< launches no NCCL kernels: safe beside the serving loop's NCCL
  bool crosses_nodes = false;    ///< ranks may live on different hosts
  bool device_memory = false;    ///< accepts device memory
  bool host_memory = false;      ///< accepts host memory
};

/// How the gloo backend moves data between ranks of one host.
enum class gloo_transport {
  automatic,      ///< shared_memory when every rank runs on this host with a CUDA device, else tcp
  tcp,            ///< Gloo's TCP pairs, staged through pinned host memory (also across hosts)
  shared_memory,  ///< a pinned host mailbox every rank maps: D2H into it, H2D out of it, no TCP
};
[[nodiscard]] EPLB_API std::string_view to_string(gloo_transport t) noexcept;
/// Parses "auto", "tcp" or "shared_memory"; error(errc::invalid_argument) otherwise.
[[nodiscard]] EPLB_API gloo_transport parse_gloo_transport(std::string_view name);

struct options {
  milliseconds timeout{30'000};         ///< every wait of one execute(); a silent peer fails after this
  std::size_t chunk_bytes = 16U << 20;  ///< gloo, cuda_ipc: messages move in chunks of at most this size
  /// gloo: TCP connections (and sender threads) per pair; 0 = from peers and cores, 2..16.
  /// cuda_ipc: copy streams per direction, shared by the peers; 0 = one per peer.
  int lanes = 0;
  /// gloo: cap on pinned staging memory per rank; cuda_ipc: the device mailbox of each rank
  std::size_t staging_bytes = 256U << 20;
  std::string hostname = "127.0.0.1";  ///< gloo: address this rank listens on
  /// gloo, cuda_ipc: nice value (0..19) of the threads that move data; async mode uses 10 so that
  /// the serving thread gets the CPU first (cuda_ipc then also polls the driver less often). 0
  /// leaves them at the creating thread's priority.
  int nice = 0;
  /// cuda_ipc: receivers read over NVLink from the sender's mailbox (pull) instead of senders
  /// writing into the receiver's (push, the default: measured faster on H100/H200).
  bool cuda_ipc_pull = false;
  /// cuda_ipc and gloo's shared-memory transport: cap on the rate at which each rank starts its
  /// outgoing copies (GB/s); 0 = none.
  /// Async mode can leave NVLink and memory bandwidth to the serving loop with it.
  double cuda_ipc_max_gbps = 0;
  /// gloo: the transport between ranks of one host (the shared-memory one needs CUDA and one
  /// process per rank; chunk_bytes, staging_bytes, lanes and nice then mean what they mean for
  /// cuda_ipc, whose machinery it uses with the mailbox in host memory).
  gloo_transport gloo_via = gloo_transport::automatic;
};

/// Memory registered with a communicator (communicator::register_memory); the registration ends
/// when this handle is destroyed. Empty when the backend has nothing to register.
class registration {
 public:
  registration() = default;
  explicit registration(std::function<void()> release) : release_(std::move(release)) {}
  registration(registration&& other) noexcept : release_(std::exchange(other.release_, {})) {}
  registration& operator=(registration&& other) noexcept {
    registration(std::move(other)).swap(*this);
    return *this;
  }
  registration(const registration&) = delete;
  registration& operator=(const registration&) = delete;
  ~registration() {
    if (release_) release_();
  }
  [[nodiscard]] bool active() const noexcept { return static_cast<bool>(release_); }

 private:
  void swap(registration& o) noexcept { std::swap(release_, o.release_); }
  std::function<void()> release_;
};

/// Memory and its registration; the registration always ends before the memory is freed.
struct registered_memory {
  registered_memory() = default;
  registered_memory(device::buffer m, registration r) noexcept : memory(std::move(m)), reg(std::move(r)) {}
  registered_memory(registered_memory&&) noexcept = default;
  registered_memory& operator=(registered_memory&& other) noexcept {
    reg = {};
    memory = std::move(other.memory);
    reg = std::move(other.reg);
    return *this;
  }

  device::buffer memory;
  registration reg;  ///< declared last: also destroyed first
};

class transport;  // src/comm/transport.hpp: what each backend implements
struct op;        // one queued send or receive (src/comm/transport.hpp)

/// What a caller uses: queue sends and receives, run them as a batch, wait. make_communicator()
/// makes one; the bytes move through its transport, which it owns.
class EPLB_API communicator {
 public:
  explicit communicator(std::unique_ptr<transport> t);
  /// Finishes queued execute_async() batches, then destroys the transport. Virtual so that a
  /// named kind of communicator (a test's or a tool's wrapper) can be destroyed through this type.
  virtual ~communicator();
  communicator(const communicator&) = delete;
  communicator& operator=(const communicator&) = delete;

  [[nodiscard]] int rank() const noexcept;
  [[nodiscard]] int size() const noexcept;
  [[nodiscard]] backend kind() const noexcept;
  [[nodiscard]] capabilities caps() const noexcept;

  /// Queues a send of `data` to `peer`. error(errc::invalid_argument) for a peer out of range or self.
  void add_send(std::span<const std::byte> data, int peer);
  /// Queues a receive into `data` from `peer`; the matching send must have the same size.
  void add_recv(std::span<std::byte> data, int peer);
  [[nodiscard]] std::size_t pending() const noexcept;
  /// Drops the operations queued since the last execute() (a batch whose posting failed half-way),
  /// so that they can never join a later batch.
  void discard_pending() noexcept;

  /// Runs every queued operation as one batch and clears the queue (also on failure). Errors name
  /// the peer: errc::timeout for a silent peer, errc::peer_failure for a dead one.
  void execute();
  /// Like execute(), but stream-ordered backends only enqueue the batch and return the event that
  /// marks its end on the stream, so a caller can queue more work before waiting; other backends
  /// run the batch here and return an event already complete. Pass the event to wait().
  [[nodiscard]] device::event submit();
  /// Waits for a batch from submit(): the same errors as execute() (timeout, peer failure).
  void wait(const device::event& submitted);
  /// execute() on this communicator's executor (by default a thread of its own, started on first
  /// use); `done` runs there when the batch completes (stream-ordered backends: when its stream
  /// work completes) and must only post elsewhere.
  void execute_async(std::function<void(std::exception_ptr)> done);

  /// Ends every pending and future wait of this communicator promptly with errc::cancelled (`why`
  /// in the message) and, where the backend can, tells the peers this rank is stopping, so that
  /// they fail with errc::peer_failure naming it rather than after the timeout. From any thread, at
  /// any time; idempotent, never throws. A batch in flight still ends only once nothing of it can
  /// touch its buffers. eplb_state::stop() calls it; the communicator is unusable afterwards.
  void abort(std::string_view why) noexcept;
  [[nodiscard]] bool aborted() const noexcept;

  /// Runs execute_async() jobs for an owner that has its own place for blocking work (a strand of
  /// its pool, say). It must run every job it is given, in order, one at a time: batches must
  /// reach the transport in the order they were made. The destructor waits for the jobs it posted.
  using executor = std::function<void(std::function<void()> job)>;
  /// Sets who runs execute_async() jobs; an empty one keeps the default thread.
  /// error(errc::invalid_argument) once execute_async() has been called.
  void set_executor(executor run);

  /// The stream that orders the transfers against other work (device memory); not owned.
  void set_stream(device::stream* s) noexcept;
  [[nodiscard]] device::stream* stream() const noexcept;

  /// Registers memory this rank sends from or receives into, so that transfers touching it can
  /// skip the backend's internal copies (nccl: ncclCommRegister; over NVLink NCCL then moves data
  /// straight between the two ends' buffers when both registered theirs). Every rank must register
  /// alike, since a transfer's two ends must agree. Release the handle before the memory is freed
  /// and before this communicator is destroyed. Backends without registration return an empty one.
  [[nodiscard]] registration register_memory(std::span<std::byte> region);
  /// Device memory of the kind this backend registers best (nccl: ncclMemAlloc, exportable without
  /// legacy CUDA IPC), registered with it. Empty when the backend has no such memory: allocate
  /// ordinary memory then.
  [[nodiscard]] registered_memory allocate_registered(std::size_t bytes);
  /// Allocates now the memory this communicator's batches use, so that no batch allocates (gloo over
  /// TCP: its pinned staging, options.staging_bytes, which every batch fits in); returns what it
  /// holds for batches (gloo over shared memory, cuda_ipc: the mailbox made at start). Idempotent;
  /// only between batches. NCCL's own buffers are NCCL's (it connects peers on first use unless
  /// NCCL_RUNTIME_CONNECT=0).
  device::memory_use reserve_memory();

 private:
  void check_peer(int peer, const char* what) const;
  void check_not_aborted() const;
  struct worker;

  std::unique_ptr<transport> transport_;
  std::vector<op> ops_;             // queued since the last batch
  std::unique_ptr<worker> worker_;  // last: its jobs use the transport, so it goes first
};

/// Shared state of a loopback group: its ranks are threads of this process.
class loopback_world;
[[nodiscard]] EPLB_API std::shared_ptr<loopback_world> make_loopback_world(int size);
/// Marks `rank` dead: peers waiting on it fail with errc::peer_failure naming it (fault injection).
EPLB_API void mark_dead(loopback_world& world, int rank);

/// Everything a backend may need to start; each backend reads what it uses.
struct setup {
  int rank = 0;
  int size = 1;
  std::shared_ptr<store> rendezvous;      ///< gloo, stateless_nccl: where ranks meet
  std::shared_ptr<loopback_world> world;  ///< loopback: the shared group
  device::device* dev = nullptr;          ///< staging memory and streams (gloo), GPU (nccl)
  void* external_nccl_comm = nullptr;     ///< nccl: an ncclComm_t owned by the host engine
  options opts;
};

/// Creates a communicator. error(errc::backend_unavailable) when `b` was not built or cannot run
/// here (no GPU for nccl...), error(errc::invalid_argument) when `s` lacks what `b` needs.
[[nodiscard]] EPLB_API std::unique_ptr<communicator> make_communicator(backend b, const setup& s);

struct backend_status {
  backend kind;
  bool built;
  bool runnable;
  std::string reason;  ///< why it is not built or cannot run here
};
/// Every backend eplb knows, whether it was compiled in and whether it can run on this machine.
[[nodiscard]] EPLB_API std::vector<backend_status> backend_report();

}  // namespace eplb::comm

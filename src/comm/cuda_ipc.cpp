// CUDA IPC: ranks are processes on one node, one GPU each. Every rank allocates one device mailbox
// at start and shares its IPC handle through the store; a transfer is a cudaMemcpyAsync between two
// GPUs' memory (copy engines over NVLink: no NCCL, no kernels, no SMs taken from the serving loop).
//
// Each ordered pair (sender, receiver) owns a region of a mailbox, cut into slots of at most
// chunk_bytes (2..64 of them: a deep queue keeps the copy engine busy while hand-offs travel). In push
// mode (default) the region lives on the receiver: the sender copies its data straight into it over
// NVLink and the receiver copies it out locally; in pull mode it lives on the sender, which packs
// locally, and the receiver reads over NVLink. A pair's messages of one batch form one byte stream,
// moved as a FIFO of slot-sized chunks.
//
// Hand-offs go through a small shared-memory block, not IPC events: a rank publishes "chunk k is
// in the slot" or "chunk k was copied out" as a counter once its own CUDA event for that copy has
// completed. No GPU stream ever waits on another process, so a dead or stalled peer cannot wedge a
// stream; the host loop sees the counters, a peer's failure flag and whether its process is alive,
// and every wait ends by the timeout. Batches run in order on this communicator's own thread:
// submit() returns at once, so a caller can queue the next layer's copies while one moves. Every
// batch starts with a manifest per pair (message count,
// total bytes, a hash of the sizes), so mismatched sizes are an error on both sides, not a hang.
//
// The same machinery is gloo's shared-memory transport between processes of one host: there each
// mailbox is a POSIX shared-memory segment that every rank maps and pins, so the sender's copy engine
// writes D2H into the receiver's mailbox and the receiver's copies it out H2D (no socket, no CPU copy).
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "comm/backends.hpp"
#include "comm/host_identity.hpp"
#include "device/cuda_check.hpp"
#include "device/event_state.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"
#include "util/job_thread.hpp"
#include "util/thread_priority.hpp"

namespace eplb::comm {
namespace {

using clock = std::chrono::steady_clock;
using device::cuda::check;

constexpr std::size_t max_slots = 64;         // chunks of one pair in flight, at most
constexpr std::size_t min_slot_bytes = 4096;  // below this, host hand-offs would dominate
constexpr std::size_t slot_align = 256;
constexpr int max_ranks = 256;

// One cache line per counter block so the two writers of a pair never share a line.
struct alignas(64) pair_control {
  std::atomic<std::uint64_t> manifest_posted;      // by the sender: manifests written so far
  std::atomic<std::uint64_t> manifest_read;        // by the receiver: manifests it has checked
  std::atomic<std::uint64_t> count;                // the current manifest: messages,
  std::atomic<std::uint64_t> total;                // their bytes,
  std::atomic<std::uint64_t> hash;                 // and a hash of their sizes in order
  std::atomic<std::uint64_t> filled;               // by the sender: chunks placed in the slots
  alignas(64) std::atomic<std::uint64_t> drained;  // by the receiver: chunks copied out
};

struct alignas(64) rank_control {
  std::atomic<std::uint32_t> failed;
  char reason[252];
};

struct control_block {
  std::atomic<std::uint64_t> magic;
  std::uint32_t size;
  // followed by rank_control[size], then pair_control[size * size]
};

constexpr std::uint64_t control_magic = 0x6570'6c62'6970'6331ULL;

std::size_t control_bytes(int size) {
  const auto n = static_cast<std::size_t>(size);
  return 64 + n * sizeof(rank_control) + n * n * sizeof(pair_control);
}

std::string hex(const void* data, std::size_t n) {
  std::string out;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) out += fmt::format("{:02x}", p[i]);
  return out;
}

bool unhex(const std::string& s, void* data, std::size_t n) {
  if (s.size() != 2 * n) return false;
  auto* p = static_cast<unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    unsigned v = 0;
    if (std::sscanf(s.c_str() + 2 * i, "%2x", &v) != 1) return false;
    p[i] = static_cast<unsigned char>(v);
  }
  return true;
}

// Where a rank lives and how to reach its mailbox; published as one line of fields.
struct rank_info {
  std::string host;
  std::string boot_id;
  std::string pid_ns;
  long pid = 0;
  int ordinal = 0;
  std::string handle;  // hex of cudaIpcMemHandle_t, or the shared-memory name of a host mailbox
  std::string layout;  // mailbox geometry and direction: must be the same on every rank

  std::string encode() const {
    return fmt::format("{}\n{}\n{}\n{}\n{}\n{}\n{}", host, boot_id, pid_ns, pid, ordinal, handle, layout);
  }
  static rank_info decode(const std::string& text, int rank, const char* name_) {
    std::istringstream in(text);
    rank_info r;
    std::string pid, ordinal;
    if (!std::getline(in, r.host) || !std::getline(in, r.boot_id) || !std::getline(in, r.pid_ns) ||
        !std::getline(in, pid) || !std::getline(in, ordinal) || !std::getline(in, r.handle) ||
        !std::getline(in, r.layout)) {
      fail(errc::transport, "{}: the store entry of rank {} is malformed", name_, rank);
    }
    r.pid = std::stol(pid);
    r.ordinal = std::stoi(ordinal);
    return r;
  }
};

// False once `pid` has exited, including a zombie its parent has not reaped yet.
bool process_alive(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  const std::string stat = read_first_line(fmt::format("/proc/{}/stat", pid).c_str());
  const auto close = stat.rfind(')');
  if (close == std::string::npos || close + 2 >= stat.size()) return true;  // cannot tell: alive
  const char state = stat[close + 2];
  return state != 'Z' && state != 'X';
}

// FNV-1a over the message sizes of one pair's batch.
std::uint64_t size_hash(const std::vector<std::size_t>& sizes) {
  std::uint64_t h = 1469598103934665603ULL;
  for (auto s : sizes) {
    for (int i = 0; i < 8; ++i) {
      h ^= (s >> (8 * i)) & 0xff;
      h *= 1099511628211ULL;
    }
  }
  return h;
}

// Where the mailboxes live: device memory (cuda_ipc), or pinned host memory in POSIX shared memory
// (gloo's shared-memory transport: chunks then move D2H into the mailbox and H2D out of it).
enum class mailbox_kind { device, host_shared };

// One direction of one pair within a batch: its messages as a byte stream cut into chunks.
struct stream_state {
  int peer = -1;
  std::vector<std::byte*> data;
  std::vector<std::size_t> sizes;
  std::size_t total = 0;
  std::uint64_t chunks = 0;     // in this batch
  std::uint64_t base = 0;       // global index of this batch's first chunk
  std::uint64_t issued = 0;     // copies enqueued
  std::uint64_t completed = 0;  // copies finished and published
  std::uint64_t acked = 0;      // sends: chunks the receiver has copied out
  bool manifest_done = false;
  clock::time_point last_progress;
};

class cuda_ipc_communicator final : public transport {
 public:
  cuda_ipc_communicator(const setup& s, mailbox_kind box)
      : transport(s.rank, s.size),
        opts_(s.opts),
        host_box_(box == mailbox_kind::host_shared),
        name_(host_box_ ? "gloo (shared memory)" : "cuda_ipc") {
    if (s.dev == nullptr || s.dev->kind() != device::backend_kind::cuda) {
      fail(errc::invalid_argument, "{}: setup.dev must be a CUDA device", name_);
    }
    if (!s.rendezvous) fail(errc::invalid_argument, "{}: setup.rendezvous (a store) is missing", name_);
    if (size() > max_ranks) fail(errc::invalid_argument, "{}: at most {} ranks, got {}", name_, max_ranks, size());
    ordinal_ = s.dev->ordinal();
    dev_ = s.dev;
    device::cuda::use_device(ordinal_);
    store_ = s.rendezvous;
    const std::size_t peers = static_cast<std::size_t>(std::max(1, size() - 1));
    if (opts_.chunk_bytes == 0) fail(errc::invalid_argument, "{}: chunk_bytes must be > 0", name_);
    if (opts_.nice < 0 || opts_.nice > 19) {
      fail(errc::invalid_argument, "{}: nice must be in 0..19, got {}", name_, opts_.nice);
    }
    batches_->post([nice = opts_.nice] { lower_thread_priority(nice); });
    if (!(opts_.cuda_ipc_max_gbps >= 0)) {
      fail(errc::invalid_argument, "{}: cuda_ipc_max_gbps must be >= 0 (0 = no cap), got {}", name_,
           opts_.cuda_ipc_max_gbps);
    }
    if (opts_.lanes < 0 || opts_.lanes > 64) {
      fail(errc::invalid_argument, "{}: lanes must be in 0..64 (0 = one copy stream per peer), got {}", name_,
           opts_.lanes);
    }
    region_bytes_ = opts_.staging_bytes / peers / slot_align * slot_align;
    slots_ = std::clamp<std::size_t>(region_bytes_ / std::max<std::size_t>(opts_.chunk_bytes, 1), 2, max_slots);
    slot_bytes_ = region_bytes_ / slots_ / slot_align * slot_align;
    if (slot_bytes_ < min_slot_bytes) {
      fail(errc::invalid_argument,
           "{}: staging_bytes {} leaves {} bytes per slot ({} peers x {} slots); at least {} are needed", name_,
           opts_.staging_bytes, slot_bytes_, peers, slots_, min_slot_bytes);
    }
    try {
      if (size() > 1) allocate_mailbox(region_bytes_ * peers);
      connect();
    } catch (...) {
      release();
      throw;
    }
  }

  ~cuda_ipc_communicator() override {
    batches_.reset();  // runs what is queued (each batch ends by its timeouts), then joins
    release();
  }

  backend kind() const noexcept override { return host_box_ ? backend::gloo : backend::cuda_ipc; }
  capabilities caps() const noexcept override {
    return {.host_complete = true, .background_safe = true, .crosses_nodes = false, .device_memory = true};
  }

  void run(std::span<const op> ops) override { await(enqueue(ops)); }

  // Queues the batch on the batch thread; the returned event completes (or fails) with it. Our
  // copies start after the work already queued on the caller's stream, so that point is marked now.
  device::event enqueue(std::span<const op> ops) override {
    if (broken_.load(std::memory_order_acquire)) {
      fail(errc::transport, "{} rank {}: broken by an earlier failure ({}); create a new communicator", name_, rank(),
           broken_reason_);
    }
    device::cuda::use_device(ordinal_);
    cudaEvent_t start = nullptr;
    if (stream() != nullptr) {
      check(cudaEventCreateWithFlags(&start, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      const auto st = cudaEventRecord(start, static_cast<cudaStream_t>(stream()->native_handle()));
      if (st != cudaSuccess) (void)cudaEventDestroy(start);
      check(st, "cudaEventRecord");
    }
    auto done = std::make_shared<device::detail::event_state>();
    batches_->post([this, batch = std::vector<op>(ops.begin(), ops.end()), start, done] {
      std::exception_ptr failure;
      try {
        if (broken_.load(std::memory_order_acquire)) {
          fail(errc::transport, "{} rank {}: broken by an earlier failure ({})", name_, rank(), broken_reason_);
        }
        run_batch(batch, start);
      } catch (const error& e) {
        break_with(e.what());
        failure = std::current_exception();
      } catch (...) {
        break_with("unexpected exception");
        failure = std::current_exception();
      }
      if (start != nullptr) (void)cudaEventDestroy(start);
      done->complete(failure);
    });
    return device::event(done);
  }

  // Waits for a submitted batch. The batch ends by itself (its own timeouts); this bound only
  // guards against a batch thread that stopped making progress without noticing.
  void await(const device::event& e) override {
    auto seen = progress_.load(std::memory_order_relaxed);
    auto last = clock::now();
    while (!e.wait_for(std::chrono::microseconds(500))) {
      const auto now_seen = progress_.load(std::memory_order_relaxed);
      if (now_seen != seen) {
        seen = now_seen;
        last = clock::now();
      } else if (clock::now() - last > 2 * opts_.timeout) {
        fail(errc::timeout, "{} rank {}: the batch made no progress for {} ms", name_, rank(),
             2 * opts_.timeout.count());
      }
    }
  }

 private:
  // ---- start-up ----------------------------------------------------------------------------

  void connect() {
    cudaIpcMemHandle_t handle{};
    if (!host_box_ && mailbox_.data() != nullptr) {
      check(cudaIpcGetMemHandle(&handle, mailbox_.data()), "cudaIpcGetMemHandle");
    }
    const auto where = this_process();
    rank_info me{where.host,
                 where.boot_id,
                 where.pid_ns,
                 where.pid,
                 ordinal_,
                 host_box_ ? box_name_ : hex(&handle, sizeof handle),
                 fmt::format("staging_bytes {}, chunk_bytes {}, {}, {} mailbox", opts_.staging_bytes, opts_.chunk_bytes,
                             opts_.cuda_ipc_pull ? "pull" : "push", host_box_ ? "host" : "device")};
    store_->set(fmt::format("cuda_ipc/rank/{}", rank()), me.encode());
    infos_.resize(static_cast<std::size_t>(size()));
    for (int r = 0; r < size(); ++r) {
      infos_[static_cast<std::size_t>(r)] =
          r == rank() ? me
                      : rank_info::decode(store_->get(fmt::format("cuda_ipc/rank/{}", r), opts_.timeout), r, name_);
    }
    for (int r = 0; r < size(); ++r) {
      const auto& other = infos_[static_cast<std::size_t>(r)];
      if (other.boot_id != me.boot_id) {
        fail(errc::invalid_config,
             "{}: rank {} runs on host {} and rank {} on host {}: cuda_ipc connects the GPUs of one node "
             "(use nccl or gloo across nodes)",
             name_, rank(), me.host, r, other.host);
      }
      if (other.layout != me.layout) {
        fail(errc::invalid_argument, "{}: rank {} uses {}, rank {} uses {}; every rank must pass the same", name_,
             rank(), me.layout, r, other.layout);
      }
      if (r != rank() && other.pid == me.pid && other.pid_ns == me.pid_ns) {
        fail(errc::invalid_config, "{}: ranks {} and {} are threads of one process; cuda_ipc needs one process per GPU",
             name_, rank(), r);
      }
    }
    pid_checks_ = std::all_of(infos_.begin(), infos_.end(), [&](const rank_info& r) { return r.pid_ns == me.pid_ns; });
    open_control();
    peer_mailbox_.assign(static_cast<std::size_t>(size()), nullptr);
    for (int r = 0; r < size(); ++r) {
      if (r == rank()) continue;
      if (host_box_) {
        peer_mailbox_[static_cast<std::size_t>(r)] = map_host_box(infos_[static_cast<std::size_t>(r)].handle, r);
        continue;
      }
      cudaIpcMemHandle_t h{};
      if (!unhex(infos_[static_cast<std::size_t>(r)].handle, &h, sizeof h)) {
        fail(errc::transport, "{}: rank {} published a malformed IPC handle", name_, r);
      }
      void* p = nullptr;
      const auto st = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
      if (st != cudaSuccess) {
        (void)cudaGetLastError();
        fail(errc::backend_unavailable, "{} rank {}: cannot map the mailbox of rank {} (GPU {}): {}", name_, rank(), r,
             infos_[static_cast<std::size_t>(r)].ordinal, cudaGetErrorString(st));
      }
      peer_mailbox_[static_cast<std::size_t>(r)] = static_cast<std::byte*>(p);
    }
    auto make_stream = [] {
      cudaStream_t st = nullptr;
      check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      return st;
    };
    auto make_event = [] {
      cudaEvent_t ev = nullptr;
      check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      return ev;
    };
    const auto n = static_cast<std::size_t>(size());
    // Copy streams per direction: one per peer (lanes 0), or `lanes` shared round-robin.
    const std::size_t lanes = opts_.lanes == 0 ? n : static_cast<std::size_t>(opts_.lanes);
    for (std::size_t i = 0; i < std::min(lanes, n); ++i) {
      owned_streams_.push_back(make_stream());
      owned_streams_.push_back(make_stream());
    }
    out_streams_.assign(n, nullptr);
    in_streams_.assign(n, nullptr);
    out_events_.assign(n * slots_, nullptr);
    in_events_.assign(n * slots_, nullptr);
    for (std::size_t r = 0; r < n; ++r) {
      if (static_cast<int>(r) == rank()) continue;
      const std::size_t lane = r % (owned_streams_.size() / 2);
      out_streams_[r] = owned_streams_[2 * lane];
      in_streams_[r] = owned_streams_[2 * lane + 1];
      for (std::size_t k = 0; k < slots_; ++k) {
        out_events_[r * slots_ + k] = make_event();
        in_events_[r * slots_ + k] = make_event();
      }
    }
    sent_base_.assign(n, 0);
    received_base_.assign(n, 0);
    manifests_sent_.assign(n, 0);
    manifests_received_.assign(n, 0);
    // Everyone has mapped everything before the control block's name disappears.
    store_barrier(*store_, "cuda_ipc/ready", size(), opts_.timeout);
    if (rank() == 0) (void)::shm_unlink(shm_name_.c_str());
    if (!box_name_.empty()) (void)::shm_unlink(box_name_.c_str());
    box_name_.clear();
  }

  // The mailbox: device memory shared through a CUDA IPC handle, or host memory in a POSIX
  // shared-memory segment that every rank maps and pins (D2H into it, H2D out of it: no TCP).
  void allocate_mailbox(std::size_t bytes) {
    box_bytes_ = bytes;
    if (!host_box_) {
      mailbox_ = dev_->allocate(bytes, device::memory_kind::device);
      return;
    }
    std::random_device rd;
    box_name_ = fmt::format("/eplb-box-{}-{:016x}", ::getpid(), (static_cast<std::uint64_t>(rd()) << 32) ^ rd());
    const int fd = ::shm_open(box_name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) fail(errc::transport, "{}: shm_open({}) failed: {}", name_, box_name_, std::strerror(errno));
    // Reserved now: on a full /dev/shm this fails here instead of a later page fault killing the process.
    if (const int e = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); e != 0) {
      ::close(fd);
      (void)::shm_unlink(box_name_.c_str());
      fail(errc::backend_unavailable, "{}: reserving {} bytes of shared memory for {} failed: {}", name_, bytes,
           box_name_, std::strerror(e));
    }
    own_box_ = pin_mapping(fd, box_name_, -1);
  }

  std::byte* map_host_box(const std::string& name, int owner) {
    const int fd = ::shm_open(name.c_str(), O_RDWR, 0600);
    if (fd < 0) {
      fail(errc::invalid_config, "{} rank {}: cannot open the mailbox {} of rank {} ({}): ranks must share a host",
           name_, rank(), name, owner, std::strerror(errno));
    }
    return pin_mapping(fd, name, owner);
  }

  // Maps `fd` (closed here) and pins the mapping for the copy engines.
  std::byte* pin_mapping(int fd, const std::string& name, int owner) {
    void* p = ::mmap(nullptr, box_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) fail(errc::transport, "{}: mmap of {} failed: {}", name_, name, std::strerror(errno));
    const auto st = cudaHostRegister(p, box_bytes_, cudaHostRegisterPortable);
    if (st != cudaSuccess) {
      (void)cudaGetLastError();
      (void)::munmap(p, box_bytes_);
      fail(errc::backend_unavailable, "{} rank {}: cannot pin the mailbox {}{} ({} bytes): {}", name_, rank(), name,
           owner < 0 ? std::string() : fmt::format(" of rank {}", owner), box_bytes_, cudaGetErrorString(st));
    }
    return static_cast<std::byte*>(p);
  }

  void unmap_host_box(std::byte* p) noexcept {
    if (p == nullptr) return;
    (void)cudaHostUnregister(p);
    (void)::munmap(p, box_bytes_);
  }

  // The control block: rank 0 creates it under a random name and publishes the name.
  void open_control() {
    const auto bytes = control_bytes(size());
    int fd = -1;
    if (rank() == 0) {
      std::random_device rd;
      shm_name_ = fmt::format("/eplb-ipc-{}-{:016x}", ::getpid(), (static_cast<std::uint64_t>(rd()) << 32) ^ rd());
      fd = ::shm_open(shm_name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
      if (fd < 0) fail(errc::transport, "{}: shm_open({}) failed: {}", name_, shm_name_, std::strerror(errno));
      if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        const int e = errno;
        ::close(fd);
        (void)::shm_unlink(shm_name_.c_str());
        fail(errc::transport, "{}: sizing shared memory {} failed: {}", name_, shm_name_, std::strerror(e));
      }
    } else {
      shm_name_ = store_->get("cuda_ipc/control", opts_.timeout);
      fd = ::shm_open(shm_name_.c_str(), O_RDWR, 0600);
      if (fd < 0) {
        fail(errc::invalid_config,
             "{} rank {}: cannot open the shared memory {} of rank 0 ({}): ranks must share a node and /dev/shm", name_,
             rank(), shm_name_, std::strerror(errno));
      }
    }
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) fail(errc::transport, "{}: mmap of {} failed: {}", name_, shm_name_, std::strerror(errno));
    control_ = p;
    control_size_ = bytes;
    auto* head = static_cast<control_block*>(control_);
    if (rank() == 0) {
      std::memset(control_, 0, bytes);  // a fresh segment is zero already; say so explicitly
      head->size = static_cast<std::uint32_t>(size());
      head->magic.store(control_magic, std::memory_order_release);
      store_->set("cuda_ipc/control", shm_name_);
    } else if (head->magic.load(std::memory_order_acquire) != control_magic ||
               head->size != static_cast<std::uint32_t>(size())) {
      fail(errc::transport, "{} rank {}: shared memory {} does not hold a {}-rank control block", name_, rank(),
           shm_name_, size());
    }
  }

  rank_control& rank_ctl(int r) const { return reinterpret_cast<rank_control*>(static_cast<char*>(control_) + 64)[r]; }
  pair_control& pair_ctl(int sender, int receiver) const {
    auto* pairs = reinterpret_cast<pair_control*>(static_cast<char*>(control_) + 64 +
                                                  static_cast<std::size_t>(size()) * sizeof(rank_control));
    return pairs[static_cast<std::size_t>(sender) * static_cast<std::size_t>(size()) +
                 static_cast<std::size_t>(receiver)];
  }

  // The region of pair (sender -> receiver) in the mailbox that holds it: the receiver's in push
  // mode, the sender's in pull mode. Regions are indexed by the other rank, skipping the owner.
  std::byte* slot_ptr(int sender, int receiver, std::uint64_t chunk) const {
    const int owner = opts_.cuda_ipc_pull ? sender : receiver;
    const int other = opts_.cuda_ipc_pull ? receiver : sender;
    std::byte* base = owner == rank() ? own_mailbox() : peer_mailbox_[static_cast<std::size_t>(owner)];
    const auto index = static_cast<std::size_t>(other < owner ? other : other - 1);
    return base + index * region_bytes_ + static_cast<std::size_t>(chunk % slots_) * slot_bytes_;
  }

  // ---- one batch ---------------------------------------------------------------------------

  void run_batch(std::span<const op> ops, cudaEvent_t start) {
    device::cuda::use_device(ordinal_);
    const auto n = static_cast<std::size_t>(size());
    std::vector<stream_state> sends(n), recvs(n);
    for (const auto& o : ops) {
      auto& st = (o.is_send ? sends : recvs)[static_cast<std::size_t>(o.peer)];
      st.peer = o.peer;
      st.data.push_back(o.data);
      st.sizes.push_back(o.bytes);
      st.total += o.bytes;
    }
    const auto now = clock::now();
    // Peers in shift order: rank r serves r+1, r+2, ... and drains r-1, r-2, ... Copy engines run
    // copies roughly in the order they were issued, so issuing every rank's sends to the same
    // peer first would pile all writers onto one GPU; in shift order each phase is a permutation.
    std::vector<stream_state*> active_sends, active_recvs;
    for (std::size_t shift = 1; shift < n; ++shift) {
      const std::size_t to = (static_cast<std::size_t>(rank()) + shift) % n;
      const std::size_t from = (static_cast<std::size_t>(rank()) + n - shift) % n;
      for (auto* st : {&sends[to], &recvs[from]}) {
        const std::size_t p = st == &sends[to] ? to : from;
        if (st->peer < 0) continue;
        st->chunks = (st->total + slot_bytes_ - 1) / slot_bytes_;
        st->base = st == &sends[p] ? sent_base_[p] : received_base_[p];
        st->last_progress = now;
        (st == &sends[p] ? active_sends : active_recvs).push_back(st);
      }
    }
    // Our copies start after the work the caller queued before submitting (e.g. packing).
    if (start != nullptr) {
      for (auto* st : active_sends) {
        check(cudaStreamWaitEvent(out_streams_[static_cast<std::size_t>(st->peer)], start, 0), "cudaStreamWaitEvent");
      }
      for (auto* st : active_recvs) {
        check(cudaStreamWaitEvent(in_streams_[static_cast<std::size_t>(st->peer)], start, 0), "cudaStreamWaitEvent");
      }
    }
    try {
      drive(active_sends, active_recvs);
    } catch (...) {
      (void)settle();  // no copy of ours may still touch the caller's buffers or a mailbox
      throw;
    }
    for (auto* st : active_sends) sent_base_[static_cast<std::size_t>(st->peer)] += st->chunks;
    for (auto* st : active_recvs) received_base_[static_cast<std::size_t>(st->peer)] += st->chunks;
  }

  void drive(const std::vector<stream_state*>& sends, const std::vector<stream_state*>& recvs) {
    int idle_rounds = 0;
    auto next_liveness = clock::now();
    for (;;) {
      bool progress = false;
      bool done = true;
      // A send issues its copies once every earlier one in shift order has issued all of its own.
      bool earlier_issued = true;
      for (auto* st : sends) {
        progress |= advance_send(*st, earlier_issued);
        earlier_issued &= st->issued == st->chunks;
        done &= finished(*st);
      }
      for (auto* st : recvs) {
        progress |= advance_recv(*st);
        done &= finished(*st);
      }
      if (done) return;
      const auto now = clock::now();
      if (progress) {
        progress_.fetch_add(1, std::memory_order_relaxed);
        idle_rounds = 0;
        continue;
      }
      check_peers(sends, recvs, now, now >= next_liveness);
      if (now >= next_liveness) next_liveness = now + std::chrono::milliseconds(5);
      // Spin briefly (a chunk takes tens of microseconds), then back off. With `nice` (async mode)
      // poll about once per 16 MiB chunk instead: measured on 4 H200, that gave up ~6% of exchange
      // speed for less serving-step inflation, because spinning on the driver delays the serving
      // thread's launches.
      if (opts_.nice > 0) {
        if (++idle_rounds < 4) {
          std::this_thread::yield();
        } else {
          std::this_thread::sleep_for(std::chrono::microseconds(idle_rounds < 2000 ? 20 : 200));
        }
      } else if (++idle_rounds < 64) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(idle_rounds < 1024 ? 5 : 100));
      }
    }
  }

  // A send is finished only once the receiver has copied every chunk out: then no copy anywhere
  // still needs this rank (its mailbox may go away, its process may exit).
  static bool finished(const stream_state& st) {
    return st.manifest_done && st.completed == st.chunks && st.acked == st.chunks;
  }

  bool advance_send(stream_state& st, bool may_issue) {
    const auto p = static_cast<std::size_t>(st.peer);
    auto& ctl = pair_ctl(rank(), st.peer);
    bool progress = false;
    if (!st.manifest_done) {
      // The receiver has checked our previous manifest, so its fields may be overwritten.
      if (ctl.manifest_read.load(std::memory_order_acquire) == manifests_sent_[p]) {
        ctl.count.store(st.sizes.size(), std::memory_order_relaxed);
        ctl.total.store(st.total, std::memory_order_relaxed);
        ctl.hash.store(size_hash(st.sizes), std::memory_order_relaxed);
        ctl.manifest_posted.store(++manifests_sent_[p], std::memory_order_release);
        st.manifest_done = true;
        progress = true;
      }
    }
    const std::uint64_t drained = ctl.drained.load(std::memory_order_acquire);
    if (drained > st.base + st.acked && st.acked < st.chunks) {
      st.acked = std::min(st.chunks, drained - st.base);
      progress = true;
    }
    while (may_issue && st.issued < st.chunks && st.base + st.issued - drained < slots_ && paced(st)) {
      const std::uint64_t g = st.base + st.issued;
      copy_chunk(st, st.issued, slot_ptr(rank(), st.peer, g), true, out_streams_[p]);
      check(cudaEventRecord(out_events_[p * slots_ + g % slots_], out_streams_[p]), "cudaEventRecord");
      ++st.issued;
      progress = true;
    }
    while (st.completed < st.issued && event_done(out_events_[p * slots_ + (st.base + st.completed) % slots_])) {
      ++st.completed;
      ctl.filled.store(st.base + st.completed, std::memory_order_release);
      progress = true;
    }
    if (progress) st.last_progress = clock::now();
    return progress;
  }

  bool advance_recv(stream_state& st) {
    const auto p = static_cast<std::size_t>(st.peer);
    auto& ctl = pair_ctl(st.peer, rank());
    bool progress = false;
    if (!st.manifest_done) {
      if (ctl.manifest_posted.load(std::memory_order_acquire) > manifests_received_[p]) {
        const auto count = ctl.count.load(std::memory_order_relaxed);
        const auto total = ctl.total.load(std::memory_order_relaxed);
        const auto hash = ctl.hash.load(std::memory_order_relaxed);
        if (count != st.sizes.size() || total != st.total || hash != size_hash(st.sizes)) {
          fail(errc::invalid_argument,
               "{} rank {}: sizes do not match: rank {} sends {} message(s) of {} bytes in all, this rank "
               "expects {} message(s) of {} bytes{}",
               name_, rank(), st.peer, count, total, st.sizes.size(), st.total,
               count == st.sizes.size() && total == st.total ? " (same totals, different sizes)" : "");
        }
        ctl.manifest_read.store(++manifests_received_[p], std::memory_order_release);
        st.manifest_done = true;
        progress = true;
      }
    }
    if (st.manifest_done) {
      const std::uint64_t filled = ctl.filled.load(std::memory_order_acquire);
      while (st.issued < st.chunks && st.base + st.issued < filled) {
        const std::uint64_t g = st.base + st.issued;
        copy_chunk(st, st.issued, slot_ptr(st.peer, rank(), g), false, in_streams_[p]);
        check(cudaEventRecord(in_events_[p * slots_ + g % slots_], in_streams_[p]), "cudaEventRecord");
        ++st.issued;
        progress = true;
      }
    }
    while (st.completed < st.issued && event_done(in_events_[p * slots_ + (st.base + st.completed) % slots_])) {
      ++st.completed;
      ctl.drained.store(st.base + st.completed, std::memory_order_release);
      progress = true;
    }
    st.acked = st.completed;
    if (progress) st.last_progress = clock::now();
    return progress;
  }

  // With a rate cap, a chunk may start once the previous ones have had their share of time; the
  // pace carries over between batches, so an async rebalance of many layers keeps to the cap.
  bool paced(const stream_state& st) {
    if (opts_.cuda_ipc_max_gbps <= 0) return true;
    const auto now = clock::now();
    if (now < pace_next_) return false;
    const std::size_t begin = static_cast<std::size_t>(st.issued) * slot_bytes_;
    const double bytes = static_cast<double>(std::min(st.total, begin + slot_bytes_) - begin);
    pace_next_ = std::max(now, pace_next_) + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(
                                                 bytes / (opts_.cuda_ipc_max_gbps * 1e9)));
    return true;
  }

  // Copies chunk `k` of a pair's byte stream between the messages and `slot` (to the slot when
  // sending, out of it when receiving); a chunk may span several messages.
  void copy_chunk(const stream_state& st, std::uint64_t k, std::byte* slot, bool to_slot, cudaStream_t s) {
    const std::size_t begin = static_cast<std::size_t>(k) * slot_bytes_;
    const std::size_t end = std::min(st.total, begin + slot_bytes_);
    std::size_t msg_start = 0;
    for (std::size_t i = 0; i < st.sizes.size() && msg_start < end; msg_start += st.sizes[i], ++i) {
      const std::size_t lo = std::max(begin, msg_start);
      const std::size_t hi = std::min(end, msg_start + st.sizes[i]);
      if (lo >= hi) continue;
      std::byte* msg = st.data[i] + (lo - msg_start);
      std::byte* box = slot + (lo - begin);
      check(cudaMemcpyAsync(to_slot ? box : msg, to_slot ? msg : box, hi - lo, cudaMemcpyDefault, s),
            "cudaMemcpyAsync");
    }
  }

  static bool event_done(cudaEvent_t e) {
    const auto st = cudaEventQuery(e);
    if (st == cudaSuccess) return true;
    if (st == cudaErrorNotReady) return false;
    check(st, "cudaEventQuery");
    return false;
  }

  void check_peers(const std::vector<stream_state*>& sends, const std::vector<stream_state*>& recvs,
                   clock::time_point now, bool liveness) {
    for (const auto* list : {&sends, &recvs}) {
      for (auto* st : *list) {
        if (finished(*st)) continue;
        const int p = st->peer;
        auto& rc = rank_ctl(p);
        if (rc.failed.load(std::memory_order_acquire) != 0) {
          fail(errc::peer_failure, "{} rank {}: rank {} failed: {}", name_, rank(), p,
               std::string(rc.reason, strnlen(rc.reason, sizeof rc.reason)));
        }
        const auto pid = static_cast<pid_t>(infos_[static_cast<std::size_t>(p)].pid);
        if (liveness && pid_checks_ && !process_alive(pid)) {
          fail(errc::peer_failure, "{} rank {}: rank {} (pid {}) exited", name_, rank(), p, pid);
        }
        if (now - st->last_progress > opts_.timeout) {
          fail(errc::timeout, "{} rank {}: no progress with rank {} for {} ms ({} {}/{} chunks, manifest {})", name_,
               rank(), p, opts_.timeout.count(), list == &sends ? "sent" : "received", st->completed, st->chunks,
               st->manifest_done ? "exchanged" : "pending");
        }
      }
    }
  }

  // Waits (bounded) until none of our copies runs; after that the caller's buffers are free again.
  // Waits (at most the timeout) for our copy streams; false when some copy still runs.
  bool settle() noexcept {
    const auto deadline = deadline_after(opts_.timeout);
    bool settled = true;
    for (auto* s : owned_streams_) {
      while (cudaStreamQuery(s) == cudaErrorNotReady && clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      if (cudaStreamQuery(s) == cudaErrorNotReady) settled = false;
    }
    (void)cudaGetLastError();
    return settled;
  }

  void break_with(const std::string& why) noexcept {
    if (broken_.load(std::memory_order_acquire)) return;
    broken_reason_ = why;  // written before the flag is published, never after
    broken_.store(true, std::memory_order_release);
    if (control_ == nullptr) return;
    auto& rc = rank_ctl(rank());
    const auto n = std::min(why.size(), sizeof rc.reason - 1);
    std::memcpy(rc.reason, why.data(), n);
    rc.reason[n] = '\0';
    rc.failed.store(1, std::memory_order_release);
  }

  void release() noexcept {
    (void)cudaSetDevice(ordinal_);
    // A copy that outlived the wait may still touch our mailbox: it is kept for good rather than
    // freed under that copy (and cudaFree would wait for it).
    if (!settle()) device::keep_for_good(std::move(mailbox_));
    for (auto* p : peer_mailbox_) {
      if (p == nullptr) continue;
      if (host_box_) {
        unmap_host_box(p);
      } else {
        (void)cudaIpcCloseMemHandle(p);
      }
    }
    peer_mailbox_.clear();
    unmap_host_box(own_box_);
    own_box_ = nullptr;
    if (!box_name_.empty()) (void)::shm_unlink(box_name_.c_str());
    for (auto* s : owned_streams_) (void)cudaStreamDestroy(s);
    owned_streams_.clear();
    out_streams_.clear();
    in_streams_.clear();
    for (auto* e : out_events_) {
      if (e != nullptr) (void)cudaEventDestroy(e);
    }
    for (auto* e : in_events_) {
      if (e != nullptr) (void)cudaEventDestroy(e);
    }
    out_events_.clear();
    in_events_.clear();
    if (control_ != nullptr) {
      (void)::munmap(control_, control_size_);
      control_ = nullptr;
    }
    // Rank 0 unlinks after the start-up barrier; if start-up failed before it, do it now.
    if (rank() == 0 && !shm_name_.empty()) (void)::shm_unlink(shm_name_.c_str());
    (void)cudaGetLastError();
  }

  std::byte* own_mailbox() const { return host_box_ ? own_box_ : mailbox_.data(); }

  options opts_;
  bool host_box_ = false;
  const char* name_;  // in errors: what the user asked for
  device::device* dev_ = nullptr;
  std::size_t box_bytes_ = 0;
  std::string box_name_;          // host mailbox: its shared-memory name until every rank mapped it
  std::byte* own_box_ = nullptr;  // host mailbox: this rank's mapping
  int ordinal_ = 0;
  std::shared_ptr<store> store_;
  std::size_t region_bytes_ = 0;
  std::size_t slot_bytes_ = 0;
  std::size_t slots_ = 2;
  device::buffer mailbox_;
  std::vector<rank_info> infos_;
  std::vector<std::byte*> peer_mailbox_;
  std::vector<cudaStream_t> owned_streams_;
  std::vector<cudaStream_t> out_streams_, in_streams_;  // per peer, into owned_streams_
  std::vector<cudaEvent_t> out_events_, in_events_;
  std::vector<std::uint64_t> sent_base_, received_base_, manifests_sent_, manifests_received_;
  std::string shm_name_;
  void* control_ = nullptr;
  std::size_t control_size_ = 0;
  bool pid_checks_ = false;
  std::atomic<bool> broken_{false};
  std::string broken_reason_;
  clock::time_point pace_next_{};           // earliest start of the next paced chunk
  std::atomic<std::uint64_t> progress_{0};  // hand-offs seen by the batch thread
  std::unique_ptr<job_thread> batches_ = std::make_unique<job_thread>();
};

}  // namespace

std::unique_ptr<transport> make_cuda_ipc(const setup& s) {
  return std::make_unique<cuda_ipc_communicator>(s, mailbox_kind::device);
}

std::unique_ptr<transport> make_shared_memory_gloo(const setup& s) {
  return std::make_unique<cuda_ipc_communicator>(s, mailbox_kind::host_shared);
}

}  // namespace eplb::comm

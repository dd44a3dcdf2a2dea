// Devices, streams, events and buffers: the host backend (always built; streams are in-order worker
// threads, memory is host memory, faults can be injected) and the CUDA backend. No CUDA types here.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "eplb/export.hpp"

namespace eplb::device {

using std::chrono::milliseconds;

enum class backend_kind { host, cuda };
enum class memory_kind { host, pinned, device };

[[nodiscard]] EPLB_API std::string_view to_string(backend_kind kind) noexcept;
/// "host" or "cuda"; anything else is error(errc::invalid_argument) listing the allowed names.
[[nodiscard]] EPLB_API backend_kind parse_backend_kind(std::string_view name);

[[nodiscard]] std::string_view to_string(memory_kind kind) noexcept;

/// An engine's own allocator for the memory eplb takes from a device (device::set_allocator): its
/// staging and packing buffers, a communicator's staging, the load and map buffers. `allocate`
/// returns `bytes` of `kind` memory aligned to at least 256 bytes, or nullptr when it has none
/// (eplb then fails with errc::out_of_memory); `free` gets back exactly what `allocate` returned,
/// with the same size and kind, once no queued work may touch it (device::release_after's rule),
/// possibly after the device is gone. Both may be called from any eplb thread (the serving thread,
/// the async io thread, a communicator's worker): they must be thread-safe and must not throw.
/// Pinned memory must be page-locked where the device copies it asynchronously (CUDA).
struct allocator_hook {
  std::function<void*(std::size_t bytes, memory_kind kind)> allocate;
  std::function<void(void* memory, std::size_t bytes, memory_kind kind)> free;
};

/// Bytes eplb holds for rebalances, by where they live (metrics::reserved_device_bytes...).
struct memory_use {
  std::size_t device_bytes = 0;  ///< device memory; on the host device its memory, host memory
  std::size_t pinned_bytes = 0;  ///< pinned host memory
  /// Counts `bytes` of `kind`: pinned as pinned, device and host memory as the device's.
  void add(memory_kind kind, std::size_t bytes) noexcept {
    (kind == memory_kind::pinned ? pinned_bytes : device_bytes) += bytes;
  }
  memory_use& operator+=(const memory_use& o) noexcept {
    device_bytes += o.device_bytes;
    pinned_bytes += o.pinned_bytes;
    return *this;
  }
};

namespace detail {
/// Hands `data` back to `hook.free`; never throws (a throwing hook is the engine's bug: ignored).
EPLB_API void free_through(const allocator_hook& hook, std::byte* data, std::size_t size, memory_kind kind) noexcept;
}  // namespace detail

/// Owning handle of device, pinned or host memory; frees it on destruction (through the allocator
/// hook that gave it, if any). Move-only.
class buffer {
 public:
  using deleter = void (*)(std::byte*, int ordinal) noexcept;
  buffer() = default;
  buffer(std::byte* data, std::size_t size, memory_kind kind, int ordinal, deleter free) noexcept
      : data_(data), size_(size), kind_(kind), ordinal_(ordinal), free_(free) {}
  /// Memory an allocator hook gave: goes back through `hook->free`.
  buffer(std::byte* data, std::size_t size, memory_kind kind, std::shared_ptr<const allocator_hook> hook) noexcept
      : data_(data), size_(size), kind_(kind), hook_(std::move(hook)) {}
  buffer(buffer&& other) noexcept { swap(other); }
  buffer& operator=(buffer&& other) noexcept {
    buffer(std::move(other)).swap(*this);
    return *this;
  }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  ~buffer() {
    if (data_ == nullptr) return;
    if (hook_) {
      detail::free_through(*hook_, data_, size_, kind_);
    } else if (free_ != nullptr) {
      free_(data_, ordinal_);
    }
  }

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] memory_kind kind() const noexcept { return kind_; }
  [[nodiscard]] std::span<std::byte> span() const noexcept { return {data_, size_}; }

 private:
  void swap(buffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(kind_, o.kind_);
    std::swap(ordinal_, o.ordinal_);
    std::swap(free_, o.free_);
    std::swap(hook_, o.hook_);
  }
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  memory_kind kind_ = memory_kind::host;
  int ordinal_ = 0;
  deleter free_ = nullptr;
  std::shared_ptr<const allocator_hook> hook_;
};

namespace detail {
class event_state;
}

/// Marks a point in a stream. Cheap to copy (shared state). Completes when all work enqueued on its
/// stream before record() has finished; fails when that work failed.
class EPLB_API event {
 public:
  event() = default;
  explicit event(std::shared_ptr<detail::event_state> state) : state_(std::move(state)) {}

  /// True once complete; throws error(errc::device) if the work before it failed.
  [[nodiscard]] bool query() const;
  /// Blocks until complete or `timeout` passes (error(errc::timeout)); rethrows device errors.
  void wait(milliseconds timeout) const;
  /// Waits at most `slice` (woken at once on completion); true when complete. Rethrows device
  /// errors. For loops that check something else between slices.
  [[nodiscard]] bool wait_for(std::chrono::microseconds slice) const;
  /// Calls `fn` once, when the event completes (with the failure, if any). It runs on a stream or
  /// driver thread, or inline when already complete: it must only post work elsewhere and return.
  void notify(std::function<void(std::exception_ptr)> fn) const;
  [[nodiscard]] bool valid() const noexcept { return state_ != nullptr; }
  [[nodiscard]] detail::event_state* state() const noexcept { return state_.get(); }

 private:
  std::shared_ptr<detail::event_state> state_;
};

/// An in-order queue of device work. Enqueueing is thread-safe and never blocks on the work.
class EPLB_API stream {
 public:
  virtual ~stream() = default;
  /// Copies `bytes` from src to dst in stream order (host, pinned or device memory, either way).
  virtual void copy(void* dst, const void* src, std::size_t bytes) = 0;
  /// `height` copies of `width` bytes, the i-th from src + i * src_pitch to dst + i * dst_pitch, as
  /// one operation where the backend can (CUDA: one 2D copy instead of `height` calls).
  virtual void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
                       std::size_t height);
  /// Sets `bytes` at dst to `value` in stream order.
  virtual void fill(void* dst, std::byte value, std::size_t bytes) = 0;
  /// Records an event after all work enqueued so far.
  [[nodiscard]] virtual event record() = 0;
  /// As record(), cheap enough for every step of a serving loop: nothing is created and no host
  /// function is queued (CUDA: a cudaEvent_t from a pool the stream grows once, recorded again and
  /// handed back when the last copy of the event goes). Completion is seen only by query() and
  /// wait(), so notify() callbacks run once one of those has seen it. Default: record().
  [[nodiscard]] virtual event mark() { return record(); }
  /// Makes later work on this stream wait for `e` (which may belong to another stream).
  virtual void wait(const event& e) = 0;
  /// Blocks until all enqueued work is done; error(errc::timeout) after `timeout`.
  void synchronize(milliseconds timeout) { record().wait(timeout); }
  /// cudaStream_t for the CUDA backend, nullptr for host streams.
  [[nodiscard]] virtual void* native_handle() const noexcept = 0;
};

/// Memory that queued work may still touch is freed only once that work has ended: a wait that
/// timed out leaves copies, transfers or kernels queued, and freeing their buffers then would let
/// them write into (or read from) memory the allocator has handed out again.
class EPLB_API device {
 public:
  device();
  /// Frees released buffers whose work has ended, giving work still in flight 200 ms to end; the
  /// others are kept for good (leaked on purpose and counted in leaked_bytes()), since freeing
  /// them would race with that work. Never hangs.
  virtual ~device();
  device(const device&) = delete;
  device& operator=(const device&) = delete;

  [[nodiscard]] virtual backend_kind kind() const noexcept = 0;
  [[nodiscard]] virtual int ordinal() const noexcept = 0;
  /// A new stream that does not synchronise with the legacy default stream.
  [[nodiscard]] virtual std::unique_ptr<stream> create_stream() = 0;
  /// The engine's own stream (a cudaStream_t of this device on CUDA) as an eplb stream, without
  /// taking ownership: eplb never destroys it, and it must outlive the stream object and the work
  /// eplb queued on it. Hand it to eplb_state as serving_stream and every load copy, map update
  /// and commit runs in the engine's stream order. error(errc::invalid_argument) for a null handle
  /// or on a device without native streams (the host device).
  [[nodiscard]] virtual std::unique_ptr<stream> wrap_stream(void* native);
  /// The engine's own event (a cudaEvent_t it records), not owned: eplb streams can wait on it,
  /// query() and wait() poll it (callbacks given to notify() run once a query or wait has seen it
  /// complete). Same errors as wrap_stream().
  [[nodiscard]] virtual event wrap_event(void* native);
  /// New memory; released buffers whose work has ended are freed first. Through the allocator hook
  /// when one is set (error(errc::out_of_memory) when it returns null), else the backend's.
  [[nodiscard]] buffer allocate(std::size_t bytes, memory_kind kind);
  /// The backend's own allocation, never through the hook: memory another process maps (a CUDA IPC
  /// mailbox must be a whole cudaMalloc allocation).
  [[nodiscard]] buffer allocate_direct(std::size_t bytes, memory_kind kind);
  /// Routes later allocate() calls through `hook`, so that an engine accounts eplb's memory in its
  /// own allocator; buffers allocated before keep their allocator. allocator_hook{} goes back to
  /// the backend's. error(errc::invalid_argument) when only one of its functions is set. Set it
  /// before the state that uses this device is made (or before eplb_state::reserve()).
  void set_allocator(allocator_hook hook);
  /// Whether `p` is memory this device's streams and kernels can use as device memory (CUDA: device
  /// or managed memory of this GPU; the host device: any pointer). For checking engines' buffers.
  [[nodiscard]] virtual bool is_device_memory(const void* p) const noexcept;

  /// Frees `b` once every event of `after` has completed (a failed or cancelled event counts: the
  /// work before it has ended). Checked on this thread in later allocate(), release_after() and
  /// collect_released() calls and in the destructor; never from a stream or driver callback. An
  /// invalid event stands for no work. Never throws.
  void release_after(buffer b, std::vector<event> after) noexcept;
  /// release_after(b, {s.record()}) for memory that only `s` may still touch. When recording fails
  /// (a broken stream) nothing says when its work ends, so `b` is kept for good.
  void release_after(buffer b, stream& s) noexcept;
  /// Frees released buffers whose work has ended; returns how many still wait.
  std::size_t collect_released() noexcept;
  /// Released buffers not yet freed.
  [[nodiscard]] std::size_t releases_waiting() const noexcept;

 protected:
  /// The backend's allocation (allocate() collects released buffers first).
  [[nodiscard]] virtual buffer allocate_memory(std::size_t bytes, memory_kind kind) = 0;

 private:
  struct release_list;
  std::unique_ptr<release_list> released_;
  std::atomic<std::shared_ptr<const allocator_hook>> hook_;  // set_allocator(); read by allocate() on any thread
};

/// Keeps `b` allocated until the process exits (counted in leaked_bytes()): for memory that work
/// of unknown extent (a stream that cannot even record an event) may still touch.
EPLB_API void keep_for_good(buffer b) noexcept;
/// Bytes this process deliberately never freed: buffers whose work had not ended (a stalled stream
/// or a broken one) when their device went, and keep_for_good(). They stay reachable, so leak
/// checkers do not report them.
[[nodiscard]] EPLB_API std::size_t leaked_bytes() noexcept;

/// A buffer that work on one stream uses. On destruction (or reset()) it goes to its device's
/// release_after() with an event recorded on that stream, so it outlives the work queued so far
/// even when the wait for that work timed out. The device and the stream must outlive it.
class stream_buffer {
 public:
  stream_buffer() = default;
  stream_buffer(device& dev, stream& s, buffer b) noexcept : dev_(&dev), stream_(&s), buf_(std::move(b)) {}
  /// dev.allocate(bytes, kind), used on `s`.
  stream_buffer(device& dev, stream& s, std::size_t bytes, memory_kind kind)
      : stream_buffer(dev, s, dev.allocate(bytes, kind)) {}
  stream_buffer(stream_buffer&& other) noexcept { swap(other); }
  stream_buffer& operator=(stream_buffer&& other) noexcept {
    stream_buffer(std::move(other)).swap(*this);
    return *this;
  }
  stream_buffer(const stream_buffer&) = delete;
  stream_buffer& operator=(const stream_buffer&) = delete;
  ~stream_buffer() { reset(); }

  /// Hands the memory to release_after() now; empty afterwards.
  void reset() noexcept {
    if (dev_ != nullptr && buf_.data() != nullptr) dev_->release_after(std::move(buf_), *stream_);
    buf_ = {};
  }
  [[nodiscard]] std::byte* data() const noexcept { return buf_.data(); }
  [[nodiscard]] std::size_t size() const noexcept { return buf_.size(); }
  [[nodiscard]] memory_kind kind() const noexcept { return buf_.kind(); }
  [[nodiscard]] std::span<std::byte> span() const noexcept { return buf_.span(); }

 private:
  void swap(stream_buffer& o) noexcept {
    std::swap(dev_, o.dev_);
    std::swap(stream_, o.stream_);
    std::swap(buf_, o.buf_);
  }
  device* dev_ = nullptr;
  stream* stream_ = nullptr;
  buffer buf_;
};

/// Faults and delays the host backend injects into its streams (tests and demonstrations).
struct host_faults {
  milliseconds max_delay{0};      ///< each stream operation sleeps a random time up to this
  std::int64_t fail_at_op = -1;   ///< the Nth operation (0-based, per device) fails; later work is skipped
  std::int64_t stall_at_op = -1;  ///< the Nth operation never finishes (until the stream is destroyed)
  std::uint64_t seed = 1;
};

[[nodiscard]] EPLB_API std::unique_ptr<device> make_host_device(host_faults faults = {});
/// Arms a fault on a host device: its `ops_from_now`-th next stream operation fails (tests and
/// demonstrations). error(errc::invalid_argument) for other backends.
EPLB_API void fail_host_device_after(device& host_device, std::int64_t ops_from_now);
/// The CUDA device `ordinal`; error(errc::backend_unavailable) when CUDA was not built or no such GPU.
[[nodiscard]] EPLB_API std::unique_ptr<device> make_cuda_device(int ordinal);
[[nodiscard]] EPLB_API std::unique_ptr<device> make_device(backend_kind kind, int ordinal = 0);
/// Number of usable GPUs: 0 when CUDA was not built or no driver/GPU is present.
[[nodiscard]] EPLB_API int cuda_device_count() noexcept;

}  // namespace eplb::device

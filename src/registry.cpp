// The one place that knows which backends were compiled in. Everywhere else a backend is a run-time
// value, and asking for one that is absent is errc::backend_unavailable.
#include <fmt/format.h>

#include <sys/statvfs.h>

#include <sstream>

#include "comm/backends.hpp"
#include "comm/host_identity.hpp"
#include "eplb/device/device.hpp"
#include "eplb_build_config.hpp"
#include "util/fail.hpp"

#if EPLB_HAVE_CUDA
namespace eplb::device::cuda {
std::unique_ptr<device> make_device(int ordinal);
int device_count() noexcept;
}  // namespace eplb::device::cuda
#endif

namespace eplb {

std::unique_ptr<device::device> device::make_cuda_device(int ordinal) {
#if EPLB_HAVE_CUDA
  return cuda::make_device(ordinal);
#else
  (void)ordinal;
  fail(errc::backend_unavailable, "device cuda: eplb was built without CUDA (nvcc was not found at configure time)");
#endif
}

int device::cuda_device_count() noexcept {
#if EPLB_HAVE_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

namespace comm {
namespace {

// Why the GPU backends (nccl, stateless_nccl, cuda_ipc) cannot run here, or empty when they can.
[[maybe_unused]] std::string gpu_unavailable_reason() {
  return device::cuda_device_count() > 0 ? std::string() : std::string("no usable GPU on this machine");
}

// gloo's transport, decided alike on every rank: each publishes where it runs, whether it can use
// shared memory (a CUDA device) and what it asked for, then reads everyone's. Shared memory when
// all ranks are processes of this host that can use it and none asked for tcp; a rank asking for
// shared memory where that is impossible, or ranks asking for different ones, is an error.
[[maybe_unused]] bool gloo_over_shared_memory(const setup& s) {
  if (s.size < 2 || !s.rendezvous) return false;  // make_gloo reports a missing store
  const auto me = this_process();
  // Empty when this rank can use shared memory. Each rank's mailbox takes about staging_bytes of
  // /dev/shm (containers often give it 64 MB): too little space means tcp, not a crash later.
  std::string cannot;
  if (EPLB_HAVE_CUDA == 0 || s.dev == nullptr || s.dev->kind() != device::backend_kind::cuda) {
    cannot = "has no CUDA device";
  } else if (struct statvfs fs{}; ::statvfs("/dev/shm", &fs) != 0) {
    cannot = "has no /dev/shm";
  } else if (const auto free = static_cast<std::uint64_t>(fs.f_bavail) * fs.f_frsize,
             need = static_cast<std::uint64_t>(s.opts.staging_bytes) * static_cast<std::uint64_t>(s.size);
             free < need) {
    cannot = fmt::format("has {} MB free in /dev/shm, {} ranks' mailboxes need {} MB", free >> 20, s.size, need >> 20);
  }
  const auto key = [](int r) { return fmt::format("gloo-transport/{}", r); };
  s.rendezvous->set(key(s.rank), fmt::format("{}\n{}\n{}\n{}\n{}\n{}", me.boot_id, me.pid_ns, me.pid,
                                             cannot.empty() ? "ok" : cannot, to_string(s.opts.gloo_via), me.host));
  struct entry {
    std::string boot_id, pid_ns, pid, cannot, want, host;
  };
  std::vector<entry> all;
  for (int r = 0; r < s.size; ++r) {
    std::string text;
    try {
      text = s.rendezvous->get(key(r), s.opts.timeout);
    } catch (const error& e) {
      if (e.code() != errc::timeout) throw;
      fail(errc::timeout, "gloo rank {}: rank {} did not arrive within {} ms ({})", s.rank, r, s.opts.timeout.count(),
           e.what());
    }
    std::istringstream in(text);
    entry e;
    if (!std::getline(in, e.boot_id) || !std::getline(in, e.pid_ns) || !std::getline(in, e.pid) ||
        !std::getline(in, e.cannot) || !std::getline(in, e.want) || !std::getline(in, e.host)) {
      fail(errc::transport, "gloo: the store entry {} is malformed", key(r));
    }
    all.push_back(std::move(e));
  }
  int wants_tcp = -1, wants_shm = -1;
  std::string impossible;
  for (int r = 0; r < s.size; ++r) {
    const auto& e = all[static_cast<std::size_t>(r)];
    if (e.want == to_string(gloo_transport::tcp)) wants_tcp = r;
    if (e.want == to_string(gloo_transport::shared_memory)) wants_shm = r;
    if (!impossible.empty()) continue;
    if (e.boot_id != all[0].boot_id) {
      impossible = fmt::format("rank {} runs on host {}, rank 0 on host {}", r, e.host, all[0].host);
    } else if (e.cannot != "ok") {
      impossible = fmt::format("rank {} {}", r, e.cannot);
    }
    for (int q = 0; q < r && impossible.empty(); ++q) {
      const auto& o = all[static_cast<std::size_t>(q)];
      if (o.pid == e.pid && o.pid_ns == e.pid_ns) {
        impossible = fmt::format("ranks {} and {} are threads of one process", q, r);
      }
    }
  }
  if (wants_tcp >= 0 && wants_shm >= 0) {
    fail(errc::invalid_argument, "gloo: rank {} asks for the tcp transport, rank {} for shared_memory", wants_tcp,
         wants_shm);
  }
  if (wants_shm >= 0 && !impossible.empty()) {
    fail(errc::invalid_config,
         "gloo: the shared_memory transport needs every rank on one host, one process each, "
         "with a CUDA device: {}",
         impossible);
  }
  return wants_tcp < 0 && impossible.empty();
}

}  // namespace

std::string_view to_string(gloo_transport t) noexcept {
  switch (t) {
    case gloo_transport::automatic:
      return "auto";
    case gloo_transport::tcp:
      return "tcp";
    case gloo_transport::shared_memory:
      return "shared_memory";
  }
  return "unknown";
}

gloo_transport parse_gloo_transport(std::string_view name) {
  for (auto t : {gloo_transport::automatic, gloo_transport::tcp, gloo_transport::shared_memory}) {
    if (name == to_string(t)) return t;
  }
  fail(errc::invalid_argument, "gloo: unknown transport \"{}\" (allowed: auto, tcp, shared_memory)", name);
}

std::unique_ptr<communicator> make_communicator(backend b, const setup& s) {
  switch (b) {
    case backend::loopback:
      return make_loopback(s);
    case backend::gloo:
#if EPLB_HAVE_GLOO
#if EPLB_HAVE_CUDA
      if (gloo_over_shared_memory(s)) return make_shared_memory_gloo(s);
#else
      (void)gloo_over_shared_memory(s);  // every rank takes part; with no CUDA it says tcp or fails
#endif
      return make_gloo(s);
#else
      fail(errc::backend_unavailable, "communicator gloo: eplb was built without Gloo (libgloo-dev not found)");
#endif
    case backend::nccl:
    case backend::stateless_nccl:
#if EPLB_HAVE_NCCL
      if (auto why = gpu_unavailable_reason(); !why.empty()) {
        fail(errc::backend_unavailable, "communicator {}: {}", to_string(b), why);
      }
      return make_nccl(s, b == backend::stateless_nccl);
#else
      fail(errc::backend_unavailable, "communicator {}: eplb was built without NCCL", to_string(b));
#endif
    case backend::cuda_ipc:
#if EPLB_HAVE_CUDA
      if (auto why = gpu_unavailable_reason(); !why.empty()) {
        fail(errc::backend_unavailable, "communicator cuda_ipc: {}", why);
      }
      return make_cuda_ipc(s);
#else
      fail(errc::backend_unavailable, "communicator cuda_ipc: eplb was built without CUDA");
#endif
  }
  fail(errc::internal, "make_communicator: unhandled backend {}", static_cast<int>(b));
}

std::vector<backend_status> backend_report() {
  std::vector<backend_status> out;
  out.push_back({backend::loopback, true, true, ""});
  out.push_back({backend::gloo, EPLB_HAVE_GLOO != 0, EPLB_HAVE_GLOO != 0,
                 EPLB_HAVE_GLOO ? "" : "built without Gloo (libgloo-dev not found)"});
#if EPLB_HAVE_NCCL
  const auto why = gpu_unavailable_reason();
  for (auto b : {backend::nccl, backend::stateless_nccl}) out.push_back({b, true, why.empty(), why});
#else
  for (auto b : {backend::nccl, backend::stateless_nccl}) out.push_back({b, false, false, "built without NCCL"});
#endif
#if EPLB_HAVE_CUDA
  const auto no_gpu = gpu_unavailable_reason();
  out.push_back({backend::cuda_ipc, true, no_gpu.empty(), no_gpu});
#else
  out.push_back({backend::cuda_ipc, false, false, "built without CUDA"});
#endif
  return out;
}

}  // namespace comm
}  // namespace eplb

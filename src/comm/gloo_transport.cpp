// gloo's transport between ranks (tcp or shared_memory): its names, and the choice every rank makes
// alike at start. Each rank publishes where it runs, whether it can use shared memory and what it
// asked for, then reads everyone's: shared memory when all ranks are processes of this host that
// can use it and none asked for tcp; a rank asking for shared memory where that is impossible, or
// ranks asking for different transports, is an error on every rank.
#include <fmt/format.h>

#include <sys/statvfs.h>

#include "comm/backends.hpp"
#include "comm/rank_record.hpp"
#include "eplb_build_config.hpp"
#include "util/fail.hpp"

namespace eplb::comm {
namespace {

// Fields of a rank's record, after its identity.
constexpr std::size_t field_cannot = 0;  // "ok", or why this rank cannot use shared memory
constexpr std::size_t field_want = 1;    // the transport it asked for

// Empty when this rank can use shared memory. Each rank's mailbox takes about staging_bytes of
// /dev/shm (containers often give it 64 MB): too little space means tcp, not a crash later.
std::string why_not_shared_memory(const setup& s) {
  if (EPLB_HAVE_CUDA == 0 || s.dev == nullptr || s.dev->kind() != device::backend_kind::cuda) {
    return "has no CUDA device";
  }
  struct statvfs fs {};
  if (::statvfs("/dev/shm", &fs) != 0) return "has no /dev/shm";
  const auto free = static_cast<std::uint64_t>(fs.f_bavail) * fs.f_frsize;
  const auto need = static_cast<std::uint64_t>(s.opts.staging_bytes) * static_cast<std::uint64_t>(s.size);
  if (free < need) {
    return fmt::format("has {} MB free in /dev/shm, {} ranks' mailboxes need {} MB", free >> 20, s.size, need >> 20);
  }
  return {};
}

// Why the ranks cannot share memory (the first reason found), or empty.
std::string why_ranks_cannot_share(const std::vector<rank_record>& all) {
  for (std::size_t r = 0; r < all.size(); ++r) {
    const auto& e = all[r];
    if (!same_host(e.where, all[0].where)) {
      return fmt::format("rank {} runs on host {}, rank 0 on host {}", r, e.where.host, all[0].where.host);
    }
    if (e.fields[field_cannot] != "ok") return fmt::format("rank {} {}", r, e.fields[field_cannot]);
    for (std::size_t q = 0; q < r; ++q) {
      if (same_process(all[q].where, e.where)) return fmt::format("ranks {} and {} are threads of one process", q, r);
    }
  }
  return {};
}

}  // namespace

bool gloo_over_shared_memory(const setup& s) {
  if (s.size < 2 || !s.rendezvous) return false;  // make_gloo reports a missing store
  const auto cannot = why_not_shared_memory(s);
  const rank_record mine{this_process(), {cannot.empty() ? "ok" : cannot, std::string(to_string(s.opts.gloo_via))}};
  const auto all = exchange_records(*s.rendezvous, "gloo-transport/", s.rank, s.size, mine, s.opts.timeout, "gloo");
  int wants_tcp = -1, wants_shm = -1;
  for (int r = 0; r < s.size; ++r) {
    const auto& want = all[static_cast<std::size_t>(r)].fields[field_want];
    if (want == to_string(gloo_transport::tcp)) wants_tcp = r;
    if (want == to_string(gloo_transport::shared_memory)) wants_shm = r;
  }
  if (wants_tcp >= 0 && wants_shm >= 0) {
    fail(errc::invalid_argument, "gloo: rank {} asks for the tcp transport, rank {} for shared_memory", wants_tcp,
         wants_shm);
  }
  const auto impossible = why_ranks_cannot_share(all);
  if (wants_shm >= 0 && !impossible.empty()) {
    fail(errc::invalid_config,
         "gloo: the shared_memory transport needs every rank on one host, one process each, "
         "with a CUDA device: {}",
         impossible);
  }
  return wants_tcp < 0 && impossible.empty();
}

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

}  // namespace eplb::comm

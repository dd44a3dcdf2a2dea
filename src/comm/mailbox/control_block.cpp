#include "comm/mailbox/control_block.hpp"

#include <algorithm>
#include <cstring>

#include "util/fail.hpp"

namespace eplb::comm {

struct alignas(64) control_block::rank_control {
  std::atomic<std::uint32_t> failed;
  char reason[252];
};

namespace {

struct control_header {
  std::atomic<std::uint64_t> magic;
  std::uint32_t size;
  // followed (at 64) by rank_control[size], then pair_control[size * size]
};

constexpr std::uint64_t control_magic = 0x6570'6c62'6970'6331ULL;
constexpr std::size_t header_bytes = 64;
constexpr auto control_key = "cuda_ipc/control";

}  // namespace

control_block::control_block(store& s, int rank, int size, milliseconds timeout, std::string_view who) : size_(size) {
  const auto n = static_cast<std::size_t>(size);
  const auto bytes = header_bytes + n * sizeof(rank_control) + n * n * sizeof(pair_control);
  if (rank == 0) {
    map_ = shm_mapping::create(shm_mapping::unique_name("/eplb-ipc"), bytes, shm_mapping::sizing::truncate, who);
    std::memset(map_.data(), 0, bytes);  // a fresh segment is zero already; say so explicitly
    auto* head = reinterpret_cast<control_header*>(map_.data());
    head->size = static_cast<std::uint32_t>(size);
    head->magic.store(control_magic, std::memory_order_release);
    s.set(control_key, map_.name());
    return;
  }
  const auto name = s.get(control_key, timeout);
  auto opened = shm_mapping::open(name, bytes, who);
  if (!opened) {
    fail(errc::invalid_config,
         "{} rank {}: cannot open the shared memory {} of rank 0 ({}): ranks must share a node and /dev/shm", who, rank,
         name, std::strerror(errno));
  }
  map_ = std::move(*opened);
  const auto* head = reinterpret_cast<const control_header*>(map_.data());
  if (head->magic.load(std::memory_order_acquire) != control_magic || head->size != static_cast<std::uint32_t>(size)) {
    fail(errc::transport, "{} rank {}: shared memory {} does not hold a {}-rank control block", who, rank, name, size);
  }
}

control_block::rank_control& control_block::of(int rank) const {
  return reinterpret_cast<rank_control*>(map_.data() + header_bytes)[rank];
}

pair_control& control_block::pair(int sender, int receiver) const {
  auto* pairs = reinterpret_cast<pair_control*>(map_.data() + header_bytes +
                                                static_cast<std::size_t>(size_) * sizeof(rank_control));
  return pairs[static_cast<std::size_t>(sender) * static_cast<std::size_t>(size_) + static_cast<std::size_t>(receiver)];
}

void control_block::publish_failure(int rank, std::string_view why) const noexcept {
  auto& rc = of(rank);
  const auto n = std::min(why.size(), sizeof rc.reason - 1);
  std::memcpy(rc.reason, why.data(), n);
  rc.reason[n] = '\0';
  rc.failed.store(1, std::memory_order_release);
}

std::optional<std::string> control_block::failure(int rank) const {
  const auto& rc = of(rank);
  if (rc.failed.load(std::memory_order_acquire) == 0) return std::nullopt;
  return std::string(rc.reason, strnlen(rc.reason, sizeof rc.reason));
}

}  // namespace eplb::comm

#include "comm/conformance.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

namespace eplb::testing {
namespace {

struct message {
  int src, dst, index;
  std::size_t bytes;
};

// Same on every rank: the messages of one round, per ordered pair, in pair order.
std::vector<message> plan_round(const conformance_config& cfg, int round, int size) {
  std::mt19937_64 rng(cfg.seed * 1000003 + static_cast<std::uint64_t>(round));
  const std::size_t c = cfg.chunk_bytes;
  const std::size_t shapes[] = {0, 1, 7, c - 1, c, c + 1, 3 * c + 5, 5 * c, 12345};
  std::vector<message> out;
  for (int src = 0; src < size; ++src) {
    for (int dst = 0; dst < size; ++dst) {
      if (src == dst) continue;
      const int n = std::uniform_int_distribution<int>(round == 0 ? 1 : 0, cfg.max_messages_per_pair)(rng);
      for (int i = 0; i < n; ++i) {
        const auto bytes = shapes[std::uniform_int_distribution<std::size_t>(0, std::size(shapes) - 1)(rng)];
        out.push_back({src, dst, i, bytes});
      }
    }
  }
  return out;
}

}  // namespace

std::string run_conformance(comm::communicator& comm, device::device& dev, device::stream* s,
                            const conformance_config& cfg) {
  const int me = comm.rank();
  comm.set_stream(s);
  const auto timeout = std::chrono::milliseconds(60'000);
  for (int round = 0; round < cfg.rounds; ++round) {
    const auto plan = plan_round(cfg, round, comm.size());
    // This rank's messages, each with its own buffer (device memory when staged) and host image.
    struct mine {
      message m;
      bool send;
      device::buffer buf;
      std::vector<std::byte> host;
    };
    std::vector<mine> ops;
    for (const auto& m : plan) {
      if (m.src != me && m.dst != me) continue;
      mine o{m, m.src == me, dev.allocate(m.bytes, s ? device::memory_kind::device : device::memory_kind::host),
             std::vector<std::byte>(m.bytes)};
      if (o.send) {
        for (std::size_t k = 0; k < m.bytes; ++k) o.host[k] = pattern_byte(round, m.src, m.dst, m.index, k);
      } else {
        std::fill(o.host.begin(), o.host.end(), std::byte{0xEE});
      }
      ops.push_back(std::move(o));
    }
    // Interleave peers in a random (rank-local) order while keeping each pair's order.
    std::mt19937_64 rng(cfg.seed + 77 * static_cast<std::uint64_t>(me) + static_cast<std::uint64_t>(round));
    std::vector<std::size_t> order(ops.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    // Put each (peer, direction) group back in index order, within the positions it got.
    std::vector<std::size_t> placed = order;
    for (std::size_t i = 0; i < placed.size(); ++i) {
      for (std::size_t j = i + 1; j < placed.size(); ++j) {
        auto& a = ops[placed[i]];
        auto& b = ops[placed[j]];
        const bool same = a.send == b.send && (a.send ? a.m.dst == b.m.dst : a.m.src == b.m.src);
        if (same && b.m.index < a.m.index) std::swap(placed[i], placed[j]);
      }
    }
    for (auto& o : ops) {
      if (s != nullptr) {
        s->copy(o.buf.data(), o.host.data(), o.m.bytes);
      } else if (o.m.bytes != 0) {
        std::copy(o.host.begin(), o.host.end(), o.buf.data());
      }
    }
    for (auto i : placed) {
      auto& o = ops[i];
      if (o.send) {
        comm.add_send(std::span<const std::byte>(o.buf.data(), o.m.bytes), o.m.dst);
      } else {
        comm.add_recv(std::span<std::byte>(o.buf.data(), o.m.bytes), o.m.src);
      }
    }
    comm.execute();
    for (auto& o : ops) {
      if (o.send) continue;
      if (s != nullptr) {
        s->copy(o.host.data(), o.buf.data(), o.m.bytes);
      } else if (o.m.bytes != 0) {
        std::copy(o.buf.data(), o.buf.data() + o.m.bytes, o.host.begin());
      }
    }
    if (s != nullptr) s->synchronize(timeout);
    for (auto& o : ops) {
      if (o.send) continue;
      for (std::size_t k = 0; k < o.m.bytes; ++k) {
        const auto want = pattern_byte(round, o.m.src, o.m.dst, o.m.index, k);
        if (o.host[k] != want) {
          return fmt::format("rank {} round {}: message {} from rank {} ({} bytes) differs at byte {}: {} != {}", me,
                             round, o.m.index, o.m.src, o.m.bytes, k, static_cast<int>(o.host[k]),
                             static_cast<int>(want));
        }
      }
    }
  }
  return {};
}

}  // namespace eplb::testing

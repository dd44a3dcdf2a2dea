#include "tools/exchange.hpp"

#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include "eplb/comm/store.hpp"
#include "eplb/config.hpp"
#include "tools/rank_processes.hpp"
#include "tools/runnable.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::tools {

namespace {

void check_range(const char* flag, std::int64_t v, std::int64_t lo, std::int64_t hi) {
  if (v < lo || v > hi) fail(errc::invalid_argument, "{}: must be in {}..{}, got {}", flag, lo, hi, v);
}

// Each tensor at most 4 GiB, and one rank's live weights (layers x its slots x the bundle) at most
// 64 GiB, so that a typo is an error instead of an allocation that fails or swaps.
void check_model_bytes(const exchange_config& c) {
  constexpr std::size_t max_tensor = std::size_t{1} << 32;
  constexpr double max_rank_bytes = 64.0 * (1ULL << 30);
  double bundle = 0;
  for (auto b : c.tensor_bytes) {
    if (b == 0 || b > max_tensor)
      fail(errc::invalid_argument, "--tensor-bytes: sizes must be in 1..{}, got {}", max_tensor, b);
    bundle += static_cast<double>(b);
  }
  const double per_rank = bundle * c.layers * ((c.experts + c.redundant) / c.ranks);
  if (per_rank > max_rank_bytes) {
    fail(
        errc::invalid_argument,
        "--tensor-bytes: {} layers x {} slots per rank x {} bytes per bundle is {:.0f} bytes per rank (at most 64 GiB)",
        c.layers, (c.experts + c.redundant) / c.ranks, bundle, per_rank);
  }
}

}  // namespace

void validate(const exchange_config& c) {
  check_range("--ranks", c.ranks, 2, 64);
  check_range("--layers", c.layers, 1, 10'000);
  check_range("--experts", c.experts, 1, 100'000);
  check_range("--redundant", c.redundant, 0, 100'000);
  if ((c.experts + c.redundant) % c.ranks != 0) {
    fail(errc::invalid_argument, "--experts + --redundant = {} must be divisible by --ranks {}",
         c.experts + c.redundant, c.ranks);
  }
  if (c.tensor_bytes.empty() || c.tensor_bytes.size() > 8) {
    fail(errc::invalid_argument, "--tensor-bytes: give 1 to 8 sizes, got {}", c.tensor_bytes.size());
  }
  check_model_bytes(c);
  check_range("--rounds", c.rounds, 0, 1'000'000);
  check_timeout("--timeout-ms", c.timeout, errc::invalid_argument);
  check_range("--inject-delay-ms", c.faults.max_delay.count(), 0, 60'000);
  check_range("--inject-fail-op", c.faults.fail_at_op, -1, std::numeric_limits<std::int64_t>::max());
  check_range("--fault-rank", c.fault_rank, -1, c.ranks - 1);
  check_runnable(c.backend, c.device);
}

std::byte weight_byte(int layer, expert_id expert, int tensor, std::size_t offset) noexcept {
  std::uint64_t x = (static_cast<std::uint64_t>(layer) << 44) ^ (static_cast<std::uint64_t>(expert + 1) << 24) ^
                    (static_cast<std::uint64_t>(tensor) << 56) ^ (offset * 0x9E3779B97F4A7C15ULL);
  x ^= x >> 31;
  x *= 0xD6E8FEB86659FD93ULL;
  x ^= x >> 32;
  return static_cast<std::byte>(x);
}

matrix<expert_id> round_placement(const exchange_config& cfg, int round, const matrix<expert_id>& prev) {
  const int slots = cfg.experts + cfg.redundant;
  if (round == 0) return placement::initial(cfg.layers, cfg.experts, slots, cfg.ranks).phy2log();
  std::mt19937_64 rng(cfg.seed * 7919 + static_cast<std::uint64_t>(round));
  matrix<expert_id> out = prev;
  const int per_rank = slots / cfg.ranks;
  for (int l = 0; l < cfg.layers; ++l) {
    auto row = out.row(static_cast<std::size_t>(l));
    switch ((round + l) % 4) {
      case 0: {  // random: every expert once, the rest replicas or empty slots, shuffled
        for (int e = 0; e < cfg.experts; ++e) row[e] = e;
        for (int p = cfg.experts; p < slots; ++p) {
          row[p] = std::uniform_int_distribution<int>(0, 3)(rng) == 0
                       ? empty_slot
                       : std::uniform_int_distribution<expert_id>(0, cfg.experts - 1)(rng);
        }
        std::shuffle(row.begin(), row.end(), rng);
        break;
      }
      case 1:  // permutation within each rank
        for (int r = 0; r < cfg.ranks; ++r)
          std::shuffle(row.begin() + r * per_rank, row.begin() + (r + 1) * per_rank, rng);
        break;
      case 2:  // full reshuffle of the previous row across ranks
        std::shuffle(row.begin(), row.end(), rng);
        break;
      default:  // no-op
        break;
    }
  }
  return out;
}

exec::model_shape pattern_shape(const exchange_config& cfg) {
  exec::model_shape shape;
  shape.layers = cfg.layers;
  shape.num_logical = cfg.experts;
  shape.num_physical = cfg.experts + cfg.redundant;
  shape.num_ranks = cfg.ranks;
  const auto mem = cfg.device == device::backend_kind::cuda ? device::memory_kind::device : device::memory_kind::host;
  for (std::size_t t = 0; t < cfg.tensor_bytes.size(); ++t) {
    // Odd strides: slots are not packed, so a stride bug shows up as corruption.
    shape.bundle.push_back({fmt::format("t{}", t), cfg.tensor_bytes[t], cfg.tensor_bytes[t] + 64 * t, mem});
  }
  return shape;
}

pattern_model::pattern_model(exec::model_shape shape, int rank, device::device& dev, device::stream& stream,
                             const matrix<expert_id>& map, std::chrono::milliseconds timeout)
    : shape_(std::move(shape)), dev_(dev), stream_(stream), timeout_(timeout) {
  shape_.validate();
  weights_.base.resize(static_cast<std::size_t>(shape_.layers));
  auto host = dev.allocate(largest_tensor(), device::memory_kind::host);
  try {
    fill(rank, map, host.span());
  } catch (...) {
    // A timed-out wait leaves the copy out of `host` queued: the memory goes once it has run.
    dev.release_after(std::move(host), stream_);
    throw;
  }
}

// Allocates every tensor of this rank's slots and copies each slot's recognisable bytes in,
// staged through `host` (reused once each copy is done).
void pattern_model::fill(int rank, const matrix<expert_id>& map, std::span<std::byte> host) {
  const int local = shape_.slots_per_rank();
  for (int l = 0; l < shape_.layers; ++l) {
    for (int t = 0; t < static_cast<int>(shape_.bundle.size()); ++t) {
      const auto& ts = shape_.bundle[static_cast<std::size_t>(t)];
      storage_.emplace_back(dev_, stream_, ts.stride * static_cast<std::size_t>(local), ts.memory);
      weights_.base[static_cast<std::size_t>(l)].push_back(storage_.back().data());
      const auto bytes = host.first(ts.bytes_per_expert);
      for (expert_id e = 0; e < shape_.num_logical; ++e) {
        for (std::size_t k = 0; k < bytes.size(); ++k) bytes[k] = weight_byte(l, e, t, k);
        reference_[{l, e, t}] = exec::checksum(bytes);
      }
      for (int s = 0; s < local; ++s) {
        const expert_id e = map(static_cast<std::size_t>(l), static_cast<std::size_t>(rank * local + s));
        for (std::size_t k = 0; k < bytes.size(); ++k) bytes[k] = e >= 0 ? weight_byte(l, e, t, k) : std::byte{0xAB};
        stream_.copy(weights_.slot(shape_, l, t, s), bytes.data(), bytes.size());
        stream_.synchronize(timeout_);  // `host` is reused
      }
    }
  }
}

std::size_t pattern_model::largest_tensor() const noexcept {
  std::size_t largest = 0;
  for (const auto& ts : shape_.bundle) largest = std::max(largest, ts.bytes_per_expert);
  return largest;
}

exec::checksum_fn pattern_model::reference() const {
  return [this](int layer, expert_id e, int tensor) { return reference_.at({layer, e, tensor}); };
}

std::string pattern_model::mismatch(int layer, std::span<const expert_id> row, int rank) {
  const auto expected = reference();
  const auto snap = snapshot(layer);
  std::size_t at = 0;
  for (int t = 0; t < static_cast<int>(shape_.bundle.size()); ++t) {
    const auto bytes = shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert;
    for (int s = 0; s < shape_.slots_per_rank(); ++s, at += bytes) {
      const expert_id e = row[static_cast<std::size_t>(rank * shape_.slots_per_rank() + s)];
      if (e >= 0 && exec::checksum({snap.data() + at, bytes}) != expected(layer, e, t)) {
        return fmt::format("rank {}: layer {} slot {} tensor {} does not hold expert {}'s bytes", rank, layer, s, t, e);
      }
    }
  }
  return {};
}

void pattern_model::load_expert(int layer, expert_id expert, int local_slot) {
  for (int t = 0; t < static_cast<int>(shape_.bundle.size()); ++t) {
    std::vector<std::byte> bytes(shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert);
    for (std::size_t k = 0; k < bytes.size(); ++k) bytes[k] = weight_byte(layer, expert, t, k);
    stream_.copy(weights_.slot(shape_, layer, t, local_slot), bytes.data(), bytes.size());
    stream_.synchronize(timeout_);  // `bytes` goes at the end of this iteration
  }
}

std::vector<std::byte> pattern_model::snapshot(int layer) {
  // The stream copies into device memory, not into `out`: a timed-out wait must not leave it
  // writing into a vector that the exception frees. Kept between calls (an engine's allocator hook
  // counting eplb's allocations sees none from verification).
  if (scratch_.size() < largest_tensor()) {
    scratch_ = device::stream_buffer(dev_, stream_, largest_tensor(), device::memory_kind::host);
  }
  std::byte* const scratch = scratch_.data();
  std::vector<std::byte> out;
  try {
    for (int t = 0; t < static_cast<int>(shape_.bundle.size()); ++t) {
      const auto bytes = shape_.bundle[static_cast<std::size_t>(t)].bytes_per_expert;
      for (int s = 0; s < shape_.slots_per_rank(); ++s) {
        stream_.copy(scratch, weights_.slot(shape_, layer, t, s), bytes);
        stream_.synchronize(timeout_);
        out.insert(out.end(), scratch, scratch + bytes);
      }
    }
  } catch (...) {
    scratch_.reset();  // freed once the queued copy has run
    throw;
  }
  return out;
}

exchange_result run_exchange_rank(const exchange_config& cfg, int rank, comm::communicator& c, device::device& dev) {
  validate(cfg);
  exchange_result res;
  const auto start = std::chrono::steady_clock::now();
  auto stream = dev.create_stream();  // first: everything below that queues work on it goes before it
  auto current = round_placement(cfg, 0, {});
  placement maps(current, cfg.experts, cfg.ranks);
  try {
    // Inside the try: a timed-out fill is this rank's failure, reported like any other.
    pattern_model model(pattern_shape(cfg), rank, dev, *stream, current, cfg.timeout);
    exec::rearrange_options opts;
    opts.staging_bytes = cfg.staging_bytes;
    opts.coalesce = cfg.coalesce;
    opts.register_buffers = cfg.register_buffers;
    opts.timeout = cfg.timeout;
    opts.verify = model.reference();
    exec::rearranger r(model.shape(), rank, dev, *stream, c, opts);
    for (int round = 1; round <= cfg.rounds; ++round) {
      const auto next = round_placement(cfg, round, current);
      for (const auto& st : r.rearrange(model.weights(), maps, next)) res.bytes_moved += st.bytes_received;
      current = next;
      res.rounds = round;
    }
    res.verified = true;
  } catch (const error& e) {
    res.failure = fmt::format("rank {}: [{}] {}", rank, to_string(e.code()), e.what());
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return res;
}

namespace {

exchange_result merge(const std::vector<exchange_result>& parts) {
  exchange_result out;
  out.verified = true;
  out.rounds = parts.empty() ? 0 : parts.front().rounds;
  for (const auto& p : parts) {
    out.verified = out.verified && p.verified;
    out.rounds = std::min(out.rounds, p.rounds);
    out.bytes_moved += p.bytes_moved;
    out.seconds = std::max(out.seconds, p.seconds);
    if (!p.failure.empty() && out.failure.empty()) out.failure = p.failure;
  }
  return out;
}

}  // namespace

exchange_result run_exchange(const exchange_config& cfg, const std::string& self_exe,
                             const std::vector<std::string>& child_args) {
  validate(cfg);
  if (cfg.backend == comm::backend::loopback) {
    auto world = comm::make_loopback_world(cfg.ranks);
    std::vector<std::future<exchange_result>> ranks;
    for (int r = 0; r < cfg.ranks; ++r) {
      ranks.push_back(std::async(std::launch::async, [&, r] {
        const bool faulty = cfg.fault_rank < 0 || cfg.fault_rank == r;
        auto dev = cfg.device == device::backend_kind::host
                       ? device::make_host_device(faulty ? cfg.faults : device::host_faults{})
                       : device::make_cuda_device(r);
        comm::setup s;
        s.rank = r;
        s.size = cfg.ranks;
        s.world = world;
        s.opts.timeout = cfg.timeout;
        auto c = comm::make_communicator(comm::backend::loopback, s);
        auto res = run_exchange_rank(cfg, r, *c, *dev);
        if (!res.failure.empty()) comm::mark_dead(*world, r);  // peers fail fast instead of timing out
        return res;
      }));
    }
    std::vector<exchange_result> parts;
    for (auto& f : ranks) parts.push_back(f.get());
    return merge(parts);
  }
  // Other backends: one process per rank. Every rank has its own timeouts; this deadline only
  // guards against a wedged child.
  // validate() bounds the timeout, rounds and layers, so this product fits (< 2^63 ms);
  // deadline_after() saturates where the clock's nanoseconds would not.
  const auto deadline = deadline_after(cfg.timeout * (cfg.rounds + 2) * cfg.layers + std::chrono::seconds(30));
  const auto procs = run_rank_processes(self_exe, child_args, cfg.ranks, deadline);
  std::vector<exchange_result> parts(static_cast<std::size_t>(cfg.ranks));
  for (int r = 0; r < cfg.ranks; ++r) {
    const auto& p = procs[static_cast<std::size_t>(r)];
    auto& part = parts[static_cast<std::size_t>(r)];
    std::istringstream in(p.result);
    std::string verified;
    if (p.killed) {
      part.failure = fmt::format("rank {}: did not finish in time (killed)", r);
    } else if (!(in >> verified >> part.rounds >> part.bytes_moved >> part.seconds)) {
      part.failure = fmt::format("rank {}: exited with status {} without a result", r, p.exit_status);
    } else {
      std::getline(in >> std::ws, part.failure);
      part.verified = verified == "1";
    }
  }
  return merge(parts);
}

}  // namespace eplb::tools

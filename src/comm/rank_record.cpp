#include "comm/rank_record.hpp"

#include <fmt/format.h>

#include <charconv>
#include <sstream>

#include "util/fail.hpp"

namespace eplb::comm {

std::string encode(const rank_record& r) {
  std::string out = fmt::format("{}\n{}\n{}\n{}", r.where.host, r.where.boot_id, r.where.pid_ns, r.where.pid);
  for (const auto& f : r.fields) out += "\n" + f;
  return out;
}

std::optional<rank_record> decode_record(std::string_view text, std::size_t fields) {
  std::istringstream in{std::string(text)};
  rank_record r;
  std::string pid;
  if (!std::getline(in, r.where.host) || !std::getline(in, r.where.boot_id) || !std::getline(in, r.where.pid_ns) ||
      !std::getline(in, pid)) {
    return std::nullopt;
  }
  const auto [end, ec] = std::from_chars(pid.data(), pid.data() + pid.size(), r.where.pid);
  if (ec != std::errc() || end != pid.data() + pid.size()) return std::nullopt;
  r.fields.resize(fields);
  for (auto& f : r.fields) {
    if (!std::getline(in, f)) return std::nullopt;
  }
  std::string extra;
  if (std::getline(in, extra)) return std::nullopt;
  return r;
}

std::vector<rank_record> exchange_records(store& s, std::string_view prefix, int rank, int size,
                                          const rank_record& mine, milliseconds timeout, std::string_view who) {
  const auto key = [&](int r) { return fmt::format("{}{}", prefix, r); };
  s.set(key(rank), encode(mine));
  std::vector<rank_record> all;
  for (int r = 0; r < size; ++r) {
    if (r == rank) {
      all.push_back(mine);
      continue;
    }
    std::string text;
    try {
      text = s.get(key(r), timeout);
    } catch (const error& e) {
      if (e.code() != errc::timeout) throw;
      fail(errc::timeout, "{} rank {}: rank {} did not arrive within {} ms ({})", who, rank, r, timeout.count(),
           e.what());
    }
    auto record = decode_record(text, mine.fields.size());
    if (!record) fail(errc::transport, "{}: the store entry {} is malformed", who, key(r));
    all.push_back(std::move(*record));
  }
  return all;
}

}  // namespace eplb::comm

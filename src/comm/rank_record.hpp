// What each rank publishes through the store when a shared-memory transport starts (gloo's choice
// of transport, cuda_ipc and gloo's shared-memory mailboxes): where it runs, then its transport's
// own fields, one line each. Every rank reads everyone's and applies the same checks.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "comm/host_identity.hpp"
#include "eplb/comm/store.hpp"

namespace eplb::comm {

struct rank_record {
  host_identity where;
  std::vector<std::string> fields;  ///< the transport's own, without line breaks
};

[[nodiscard]] std::string encode(const rank_record& r);
/// nullopt unless `text` holds an identity and exactly `fields` more lines.
[[nodiscard]] std::optional<rank_record> decode_record(std::string_view text, std::size_t fields);

/// Publishes `mine` under "<prefix><rank>" and reads every rank's record (index = rank), each read
/// bounded by `timeout`. Errors name `who`: errc::timeout when a rank did not arrive in time,
/// errc::transport when a record is malformed.
[[nodiscard]] std::vector<rank_record> exchange_records(store& s, std::string_view prefix, int rank, int size,
                                                        const rank_record& mine, milliseconds timeout,
                                                        std::string_view who);

}  // namespace eplb::comm

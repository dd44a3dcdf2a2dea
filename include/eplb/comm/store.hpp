// Rendezvous key-value stores: how ranks find each other (Gloo addresses, NCCL unique ids, flags).
// In-process (threads), file-based (processes sharing a directory) and TCP (one rank or launcher
// serves, everyone connects; works across hosts). Every wait has a timeout.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "eplb/export.hpp"

namespace eplb::comm {

using std::chrono::milliseconds;

/// What a store holds: the number of keys and the bytes of their names and values.
struct store_usage {
  std::size_t keys = 0;
  std::size_t bytes = 0;
};

class EPLB_API store {
 public:
  virtual ~store() = default;
  virtual void set(const std::string& key, const std::string& value) = 0;
  /// The value of `key`, waiting for it to be set; error(errc::timeout) naming the key after `timeout`.
  [[nodiscard]] virtual std::string get(const std::string& key, milliseconds timeout) = 0;
  /// Atomically adds `delta` to the integer at `key` (0 when absent) and returns the new value.
  virtual std::int64_t add(const std::string& key, std::int64_t delta) = 0;
  /// Sets `key` to `value` unless it is already set, atomically; returns the value `key` holds
  /// afterwards (`value` when this call set it). The first writer wins on every store, so ranks
  /// that race to decide something all read the same decision.
  [[nodiscard]] virtual std::string set_if_absent(const std::string& key, const std::string& value) = 0;
  /// Removes `key` (and its counter), a no-op when absent. A get() already waiting for it keeps
  /// waiting. Long-running users delete what every rank has read, so the store stays bounded.
  virtual void erase(const std::string& key) = 0;
  /// What the whole store holds now (a prefix store reports its inner store).
  [[nodiscard]] virtual store_usage usage() = 0;
};

[[nodiscard]] EPLB_API std::shared_ptr<store> make_memory_store();
/// Keys are files in `directory` (created if missing), written atomically.
[[nodiscard]] EPLB_API std::shared_ptr<store> make_file_store(const std::string& directory);
/// Connects to a TCP store server; retries until `connect_timeout` while the server starts.
[[nodiscard]] EPLB_API std::shared_ptr<store> make_tcp_store(const std::string& host, std::uint16_t port,
                                                             milliseconds connect_timeout);
/// All keys of `inner` seen through `prefix` + "/" (separates runs and communicators).
[[nodiscard]] EPLB_API std::shared_ptr<store> make_prefix_store(std::shared_ptr<store> inner, std::string prefix);

/// Serves a TCP store on a background thread until destroyed.
class EPLB_API tcp_store_server {
 public:
  /// Listens on `bind_address`:`port` (port 0 picks a free one; see port()).
  explicit tcp_store_server(const std::string& bind_address = "127.0.0.1", std::uint16_t port = 0);
  ~tcp_store_server();
  tcp_store_server(const tcp_store_server&) = delete;
  tcp_store_server& operator=(const tcp_store_server&) = delete;
  [[nodiscard]] std::uint16_t port() const noexcept;
  /// Connections accepted so far: a client opens one per thread that waits at once, and another
  /// only after the server stopped answering one (a long-running server watches this stay flat).
  [[nodiscard]] std::uint64_t connections_accepted() const noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// Blocks until `count` ranks called barrier with the same name, or error(errc::timeout).
EPLB_API void store_barrier(store& s, const std::string& name, int count, milliseconds timeout);

}  // namespace eplb::comm

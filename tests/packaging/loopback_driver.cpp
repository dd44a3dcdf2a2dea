// What a Python extension module or an engine plugin linking libeplb does, behind one C entry point
// that dlopen_loopback calls: a config parsed from JSON (nlohmann inside libeplb), a refused config
// caught as eplb::error across the library boundary (its typeinfo is libeplb's), a TCP store
// (Boost.Asio inside), and a loopback exchange between two ranks (threads) whose received bytes are
// compared with what the peer sent.
#include <eplb/comm/communicator.hpp>
#include <eplb/comm/store.hpp>
#include <eplb/config.hpp>
#include <eplb/device/device.hpp>
#include <eplb/error.hpp>

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <string>
#include <thread>
#include <vector>

namespace {

std::string check_config() {
  auto cfg = eplb::config::from_json(R"({"use_async": true, "communicator": "loopback", "window_size": 7})");
  if (!cfg.use_async || cfg.communicator != "loopback" || cfg.window_size != 7) return "config fields not parsed";
  try {
    (void)eplb::config::from_json(R"({"window_size": 0})");
    return "window_size 0 was accepted";
  } catch (const eplb::error& e) {
    if (e.code() != eplb::errc::invalid_config) return "refused config: wrong errc";
    if (std::string(e.what()).find("window_size") == std::string::npos)
      return "refused config: " + std::string(e.what());
  }
  return "";
}

std::string check_tcp_store() {
  eplb::comm::tcp_store_server server("127.0.0.1", 0);
  auto store = eplb::comm::make_tcp_store("127.0.0.1", server.port(), std::chrono::seconds(10));
  store->set("key", "value");
  auto got = store->get("key", std::chrono::seconds(10));
  return got == "value" ? "" : "tcp store returned '" + got + "'";
}

std::vector<std::byte> pattern(int rank, std::size_t bytes) {
  std::vector<std::byte> v(bytes);
  for (std::size_t i = 0; i < bytes; ++i)
    v[i] = static_cast<std::byte>((i * 31 + static_cast<std::size_t>(rank) * 7) & 0xff);
  return v;
}

std::string check_loopback_exchange() {
  constexpr int ranks = 2;
  constexpr std::size_t bytes = 1 << 16;
  auto world = eplb::comm::make_loopback_world(ranks);
  std::vector<std::string> errors(ranks);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < ranks; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        auto dev = eplb::device::make_host_device();
        eplb::comm::setup s;
        s.rank = rank;
        s.size = ranks;
        s.world = world;
        s.dev = dev.get();
        s.opts.timeout = std::chrono::seconds(20);
        auto comm = eplb::comm::make_communicator(eplb::comm::backend::loopback, s);
        auto stream = dev->create_stream();
        comm->set_stream(stream.get());
        auto sent = pattern(rank, bytes);
        std::vector<std::byte> received(bytes);
        comm->add_send(sent, 1 - rank);
        comm->add_recv(received, 1 - rank);
        comm->execute();
        if (received != pattern(1 - rank, bytes)) errors[rank] = "rank " + std::to_string(rank) + ": bytes differ";
      } catch (const std::exception& e) {
        errors[rank] = "rank " + std::to_string(rank) + ": " + e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (!e.empty()) return e;
  return "";
}

}  // namespace

/// 0 when every check passed; else 1 with the first failure in `message`.
extern "C" __attribute__((visibility("default"))) int eplb_loopback_driver(char* message, std::size_t size) {
  std::string failure;
  try {
    for (auto* check : {check_config, check_tcp_store, check_loopback_exchange}) {
      failure = check();
      if (!failure.empty()) break;
    }
  } catch (const std::exception& e) {
    failure = e.what();
  }
  std::snprintf(message, size, "%s", failure.c_str());
  return failure.empty() ? 0 : 1;
}

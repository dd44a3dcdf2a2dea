// What a Python Store object holds: the C++ store and, for a serving TCPStore, its server.
#pragma once

#include <cstdint>
#include <memory>

#include "eplb/comm/store.hpp"

namespace eplb::python {

struct store_handle {
  std::shared_ptr<comm::store> s;
  std::shared_ptr<comm::tcp_store_server> server;  // kept alive as long as a client of it is
  std::uint16_t port = 0;
};
struct memory_store_handle : store_handle {};
struct file_store_handle : store_handle {};
struct tcp_store_handle : store_handle {};
struct prefix_store_handle : store_handle {};
struct torch_store_handle : store_handle {};

}  // namespace eplb::python

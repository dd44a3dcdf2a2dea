#include "comm/nccl_library.hpp"

#include "comm/backends.hpp"

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <sstream>

#include "eplb_build_config.hpp"
#include "util/fail.hpp"

namespace eplb::comm {
namespace {

constexpr int min_version = 21900;  // ncclCommRegister, ncclMemAlloc, ncclConfig_t
constexpr const char* soname = "libnccl.so.2";

// Every loaded object whose file name holds "libnccl": an engine's NCCL, and ours.
std::vector<std::string> loaded_nccls() {
  std::vector<std::string> out;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        if (info->dlpi_name != nullptr && std::strstr(info->dlpi_name, "libnccl") != nullptr) {
          static_cast<std::vector<std::string>*>(data)->emplace_back(info->dlpi_name);
        }
        return 0;
      },
      &out);
  return out;
}

// The places to try, in order, each with the dlopen flags to use.
std::vector<std::pair<std::string, int>> candidates() {
  std::vector<std::pair<std::string, int>> out;
  if (const char* env = std::getenv("EPLB_NCCL_LIBRARY"); env != nullptr && *env != '\0') {
    out.emplace_back(env, RTLD_NOW | RTLD_LOCAL);
    return out;  // what the user named, and nothing else
  }
  out.emplace_back(soname, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);  // the process's own NCCL
  out.emplace_back(soname, RTLD_NOW | RTLD_LOCAL);
  std::stringstream dirs(EPLB_NCCL_DIRS);
  for (std::string d; std::getline(dirs, d, ':');) {
    if (!d.empty()) out.emplace_back(d + "/" + soname, RTLD_NOW | RTLD_LOCAL);
  }
  return out;
}

template <typename Fn>
void bind_symbol(void* handle, Fn& fn, const char* symbol, const std::string& path) {
  fn = reinterpret_cast<Fn>(dlsym(handle, symbol));
  if (fn == nullptr) fail(errc::backend_unavailable, "nccl: {} lacks {} (NCCL >= 2.19 needed)", path, symbol);
}

void bind_all(void* h, nccl_library& n) {
  bind_symbol(h, n.GetVersion, "ncclGetVersion", n.path);
  bind_symbol(h, n.GetUniqueId, "ncclGetUniqueId", n.path);
  bind_symbol(h, n.CommInitRankConfig, "ncclCommInitRankConfig", n.path);
  bind_symbol(h, n.CommCount, "ncclCommCount", n.path);
  bind_symbol(h, n.CommUserRank, "ncclCommUserRank", n.path);
  bind_symbol(h, n.CommFinalize, "ncclCommFinalize", n.path);
  bind_symbol(h, n.CommDestroy, "ncclCommDestroy", n.path);
  bind_symbol(h, n.CommAbort, "ncclCommAbort", n.path);
  bind_symbol(h, n.CommGetAsyncError, "ncclCommGetAsyncError", n.path);
  bind_symbol(h, n.GetErrorString, "ncclGetErrorString", n.path);
  bind_symbol(h, n.GetLastError, "ncclGetLastError", n.path);
  bind_symbol(h, n.CommRegister, "ncclCommRegister", n.path);
  bind_symbol(h, n.CommDeregister, "ncclCommDeregister", n.path);
  bind_symbol(h, n.MemAlloc, "ncclMemAlloc", n.path);
  bind_symbol(h, n.MemFree, "ncclMemFree", n.path);
  bind_symbol(h, n.GroupStart, "ncclGroupStart", n.path);
  bind_symbol(h, n.GroupEnd, "ncclGroupEnd", n.path);
  bind_symbol(h, n.Send, "ncclSend", n.path);
  bind_symbol(h, n.Recv, "ncclRecv", n.path);
}

// The file a handle was loaded from (dlopen by soname says nothing about where it was found).
std::string origin(void* handle, const std::string& fallback) {
  link_map* map = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr && *map->l_name) {
    return map->l_name;
  }
  return fallback;
}

nccl_library load() {
  std::string tried;
  for (const auto& [name, flags] : candidates()) {
    void* h = dlopen(name.c_str(), flags);
    if (h == nullptr) {
      const char* why = dlerror();
      if ((flags & RTLD_NOLOAD) == 0) tried += fmt::format("\n  {}: {}", name, why != nullptr ? why : "not found");
      continue;
    }
    nccl_library n{};  // every entry point null until bound
    n.path = origin(h, name);
    bind_all(h, n);  // never dlclose()d: communicators and registrations live until exit
    if (n.GetVersion(&n.version) != ncclSuccess || n.version < min_version) {
      fail(errc::backend_unavailable, "nccl: {} is version {}; eplb needs 2.19 or later (set EPLB_NCCL_LIBRARY)",
           n.path, n.version);
    }
    n.loaded = loaded_nccls();
    return n;
  }
  fail(errc::backend_unavailable, "nccl: {} could not be loaded (set EPLB_NCCL_LIBRARY to its path); tried:{}", soname,
       tried);
}

struct loaded_once {
  std::once_flag once;
  std::optional<nccl_library> lib;
  std::string failure;
};

loaded_once& slot() {
  static loaded_once s;
  std::call_once(s.once, [&] {
    try {
      s.lib = load();
    } catch (const error& e) {
      s.failure = e.what();
    }
  });
  return s;
}

}  // namespace

const nccl_library& nccl() {
  auto& s = slot();
  if (!s.lib) fail(errc::backend_unavailable, "{}", s.failure);
  return *s.lib;
}

std::string nccl_unavailable_reason() noexcept {
  try {
    auto& s = slot();
    return s.lib ? std::string() : s.failure;
  } catch (...) {
    return "nccl: could not be loaded";
  }
}

}  // namespace eplb::comm

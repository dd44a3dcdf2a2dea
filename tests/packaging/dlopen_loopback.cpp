// Loads libeplb into a process that already holds other copies of the code libeplb is built from,
// as a serving engine's Python process holds PyTorch (its own Gloo) and other native modules:
// usage: dlopen_loopback DRIVER [PRELOAD...]; every PRELOAD (and each library in the colon-separated
// EPLB_PRELOAD_LIBS, e.g. torch's libtorch_cpu.so) is opened first with RTLD_GLOBAL, then DRIVER
// (linked with libeplb) with RTLD_LOCAL, and its exchange runs. A preload of the generated impostor
// library defines every Boost, nlohmann, Gloo and fmt function libeplb contains, each exiting with 3
// when called: a libeplb exporting its copies would bind its own calls to them.
#include <dlfcn.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: dlopen_loopback DRIVER [PRELOAD...]\n");
    return 2;
  }
  std::vector<std::string> preload(argv + 2, argv + argc);
  if (const char* more = std::getenv("EPLB_PRELOAD_LIBS")) {
    std::string list = more;
    for (std::size_t at = 0; at <= list.size();) {
      auto end = list.find(':', at);
      if (end == std::string::npos) end = list.size();
      if (end > at) preload.push_back(list.substr(at, end - at));
      at = end + 1;
    }
  }
  for (const auto& lib : preload) {
    if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::fprintf(stderr, "preload %s: %s\n", lib.c_str(), dlerror());
      return 1;
    }
    std::printf("preloaded %s\n", lib.c_str());
  }
  void* driver = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (driver == nullptr) {
    std::fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
    return 1;
  }
  using run_fn = int (*)(char*, std::size_t);
  auto run = reinterpret_cast<run_fn>(dlsym(driver, "eplb_loopback_driver"));
  if (run == nullptr) {
    std::fprintf(stderr, "dlsym eplb_loopback_driver: %s\n", dlerror());
    return 1;
  }
  char message[512] = {};
  int rc = run(message, sizeof message);
  std::printf("%s\n", rc == 0 ? "loopback exchange, tcp store and config OK beside the preloads" : message);
  return rc;
}

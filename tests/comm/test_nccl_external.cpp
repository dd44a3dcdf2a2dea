// GPU suite (issue 18, item 3): libeplb does not link NCCL; it loads it at run time and prefers the
// copy the process already holds (comm/nccl_library.hpp). Here the "engine" loads NCCL itself with
// dlopen, makes a one-rank communicator with it and hands it to eplb: eplb must drive that
// communicator (registered memory and a batch on it; moving bytes between ranks needs two GPUs,
// the multi-GPU issue's runs), and must refuse, with a clear error and without
// touching it further, memory that is not a communicator of the loaded NCCL.
// usage: nccl_external_tests PATH-TO-libnccl.so.2. Exits 77 (skip) without a GPU.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <doctest/doctest.h>
#include <nccl.h>

#include <cstdio>
#include <string>
#include <vector>

#include "check_error.hpp"
#include "eplb/comm/communicator.hpp"
#include "eplb/device/device.hpp"
#include "eplb/versions.hpp"

using namespace eplb;
using namespace std::chrono_literals;

namespace {

std::string nccl_path;

// The engine's own NCCL: opened by path, its entry points found by name, as torch's would be.
struct engine_nccl {
  void* handle = dlopen(nccl_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  ncclResult_t (*get_unique_id)(ncclUniqueId*) = nullptr;
  ncclResult_t (*init_rank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*destroy)(ncclComm_t) = nullptr;

  engine_nccl() {
    REQUIRE_MESSAGE(handle != nullptr, dlerror());
    get_unique_id = reinterpret_cast<decltype(get_unique_id)>(dlsym(handle, "ncclGetUniqueId"));
    init_rank = reinterpret_cast<decltype(init_rank)>(dlsym(handle, "ncclCommInitRank"));
    destroy = reinterpret_cast<decltype(destroy)>(dlsym(handle, "ncclCommDestroy"));
    REQUIRE((get_unique_id && init_rank && destroy));
  }
  ncclComm_t one_rank_comm() const {
    ncclUniqueId id{};
    REQUIRE(get_unique_id(&id) == ncclSuccess);
    ncclComm_t c = nullptr;
    REQUIRE(init_rank(&c, 1, id, 0) == ncclSuccess);
    return c;
  }
};

comm::setup one_rank(device::device& dev, void* comm) {
  comm::setup s;
  s.rank = 0;
  s.size = 1;
  s.dev = &dev;
  s.external_nccl_comm = comm;
  s.opts.timeout = 20s;
  return s;
}

}  // namespace

TEST_CASE("an ncclComm_t the engine made with its own dlopen'ed NCCL is driven by eplb") {
  engine_nccl engine;
  auto dev = device::make_cuda_device(0);
  auto stream = dev->create_stream();
  const ncclComm_t native = engine.one_rank_comm();
  {
    auto c = comm::make_communicator(comm::backend::nccl, one_rank(*dev, native));
    CHECK(c->rank() == 0);
    CHECK(c->size() == 1);
    c->set_stream(stream.get());
    // ncclMemAlloc and ncclCommRegister on the engine's communicator, through eplb's loaded NCCL.
    constexpr std::size_t bytes = 1 << 20;
    auto reg = c->allocate_registered(bytes);
    REQUIRE(reg.memory.size() == bytes);
    std::vector<std::byte> pattern(bytes), back(bytes);
    for (std::size_t i = 0; i < bytes; ++i) pattern[i] = static_cast<std::byte>(i * 131 + 7);
    stream->copy(reg.memory.data(), pattern.data(), bytes);
    stream->copy(back.data(), reg.memory.data(), bytes);
    stream->synchronize(20s);
    CHECK(back == pattern);
    c->execute();  // an empty batch: one group on the engine's communicator, no error
    // One rank has no peer to move bytes to: eplb's rule, checked before NCCL is called.
    CHECK_EPLB_ERROR(c->add_send(reg.memory.span(), 0), errc::invalid_argument, "cannot exchange with itself");
  }
  // eplb never destroys a communicator it was lent: the engine still can.
  CHECK(engine.destroy(native) == ncclSuccess);
  // eplb resolved the library the process already held, and reports its version.
  bool reported = false;
  for (const auto& v : component_versions()) reported |= v.name == "nccl" && v.version.rfind("2.", 0) == 0;
  CHECK(reported);
}

TEST_CASE("memory that is not a communicator of the loaded NCCL is refused by name") {
  engine_nccl engine;  // the same library is loaded, so eplb resolves it
  auto dev = device::make_cuda_device(0);
  std::vector<std::byte> not_a_comm(64 << 20);  // zeros: no communicator's magic numbers
  CHECK_EPLB_ERROR(comm::make_communicator(comm::backend::nccl, one_rank(*dev, not_a_comm.data())),
                   errc::invalid_argument, "is not a communicator of the loaded NCCL");
}

int main(int argc, char** argv) {
  if (device::cuda_device_count() == 0) {
    std::puts("skip: no GPU");
    return 77;
  }
  if (argc < 2) {
    std::puts("usage: nccl_external_tests PATH-TO-libnccl.so.2 [doctest options]");
    return 2;
  }
  nccl_path = argv[1];
  doctest::Context context(argc - 1, argv + 1);
  return context.run();
}

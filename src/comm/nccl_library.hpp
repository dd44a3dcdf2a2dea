// NCCL, loaded at run time. An engine's process often holds an NCCL already (torch's pip wheel
// ships one), and an ncclComm_t only works with the library copy that made it: linking a second
// copy at build time invites exactly that mismatch. So eplb resolves NCCL once, in this order:
//   1. EPLB_NCCL_LIBRARY (a path), when set;
//   2. a libnccl.so.2 already loaded in the process (the engine's);
//   3. libnccl.so.2 from the dynamic linker's search path;
//   4. the directories NCCL was found in at build time.
// Only this file and nccl.cpp know NCCL's types.
#pragma once

#include <nccl.h>

#include <string>
#include <vector>

namespace eplb::comm {

/// The NCCL entry points eplb uses, resolved from one loaded library.
struct nccl_library {
  std::string path;                 ///< the file it was loaded from
  int version = 0;                  ///< ncclGetVersion, e.g. 22803
  std::vector<std::string> loaded;  ///< every libnccl in the process when it was resolved

  ncclResult_t (*GetVersion)(int*);
  ncclResult_t (*GetUniqueId)(ncclUniqueId*);
  ncclResult_t (*CommInitRankConfig)(ncclComm_t*, int, ncclUniqueId, int, ncclConfig_t*);
  ncclResult_t (*CommCount)(const ncclComm_t, int*);
  ncclResult_t (*CommUserRank)(const ncclComm_t, int*);
  ncclResult_t (*CommFinalize)(ncclComm_t);
  ncclResult_t (*CommDestroy)(ncclComm_t);
  ncclResult_t (*CommAbort)(ncclComm_t);
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*);
  const char* (*GetErrorString)(ncclResult_t);
  const char* (*GetLastError)(ncclComm_t);
  ncclResult_t (*CommRegister)(const ncclComm_t, void*, size_t, void**);
  ncclResult_t (*CommDeregister)(const ncclComm_t, void*);
  ncclResult_t (*MemAlloc)(void**, size_t);
  ncclResult_t (*MemFree)(void*);
  ncclResult_t (*GroupStart)();
  ncclResult_t (*GroupEnd)();
  ncclResult_t (*Send)(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*Recv)(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
};

/// The library, resolved on first use (thread-safe) and kept for the life of the process.
/// error(errc::backend_unavailable) naming every place tried, or the version when it is older than
/// eplb needs (2.19: registration and ncclMemAlloc). nccl_unavailable_reason() (comm/backends.hpp)
/// says the same without throwing.
[[nodiscard]] const nccl_library& nccl();

}  // namespace eplb::comm

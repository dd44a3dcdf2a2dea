// A transport over mailboxes, for ranks that are processes of one host, one device each: cuda_ipc
// (device mailboxes shared by CUDA IPC; copies between GPUs on copy engines over NVLink: no NCCL,
// no kernels, no SMs taken from the serving loop) and gloo's shared-memory transport (pinned host
// mailboxes in POSIX shared memory: D2H into them, H2D out of them, no socket, no CPU copy).
//
// In push mode (default) a pair's region lives on the receiver: the sender copies its data
// straight into it and the receiver copies it out locally; in pull mode it lives on the sender,
// which packs locally, and the receiver reads remotely. Hand-offs go through the control block
// (pair_protocol.hpp), never through IPC events, and the host loop watches the counters, a peer's
// failure flag and whether its process is alive: every wait ends by the timeout. Batches run in
// order on the transport's own thread: submit() returns at once, so a caller can queue the next
// layer's copies while one moves.
#pragma once

#include <memory>

#include "comm/mailbox/memory.hpp"
#include "comm/transport.hpp"

namespace eplb::comm {

/// error(errc::invalid_argument) for a setup the mailboxes cannot serve (no CUDA device, no store,
/// bad options), errc::invalid_config for ranks on different hosts, threads of one process or
/// mismatched mailbox settings, errc::timeout for a rank that never arrives.
[[nodiscard]] std::unique_ptr<transport> make_mailbox_transport(const setup& s, std::unique_ptr<mailbox_memory> memory);

}  // namespace eplb::comm

// EPLB_API marks what libeplb exports. The library is compiled with hidden visibility
// (-fvisibility=hidden -fvisibility-inlines-hidden) and linked with a version script, so that its
// internals and the third-party code inside it (Boost.Asio, nlohmann::json, Gloo, fmt) neither
// leak out nor bind to another copy of the same code in the process (PyTorch's Gloo, say).
// Every class and free function declared in include/eplb and defined in the library carries it;
// tests/packaging/check_symbols.py fails on one that does not.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define EPLB_API __attribute__((visibility("default")))
#else
#define EPLB_API
#endif

#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + libFuzzer) and runs each for SECONDS (default 20)
# from the corpus kept in tests/fuzz/corpus (copied, so the tree stays clean).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-20}
out=build-fuzz
mkdir -p "$out"
# A build config with no optional backend: the targets need only the CPU pieces.
mkdir -p "$out/config"
printf "#pragma once\n#define EPLB_HAVE_CUDA 0\n#define EPLB_HAVE_NCCL 0\n#define EPLB_HAVE_GLOO 0\n#define EPLB_VERSION \"fuzz\"\n" >"$out/config/eplb_build_config.hpp"
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinclude -Isrc -I"$out/config")
sources=(src/core/error.cpp src/core/load.cpp src/core/placement.cpp src/core/policy.cpp src/core/min_move.cpp
         src/core/block_matching.cpp src/core/in_place_search.cpp
         src/exec/plan_layer.cpp src/exec/plan_chunks.cpp src/exec/plan_serial.cpp src/exec/serial_stop.cpp src/exec/elastic.cpp src/exec/model.cpp src/state/config.cpp src/comm/communicator.cpp src/device/event.cpp src/device/allocator.cpp src/registry.cpp
         src/comm/loopback.cpp src/device/host_device.cpp src/tools/plan_json.cpp)
objects=()
for src in "${sources[@]}"; do
  obj="$out/$(basename "$src" .cpp).o"
  clang++ "${flags[@]/-fsanitize=fuzzer,/-fsanitize=fuzzer-no-link,}" -c -o "$obj" "$src" &
  objects+=("$obj")
done
wait
for target in plan_json config_json maps; do
  clang++ "${flags[@]}" -o "$out/fuzz_$target" "tests/fuzz/fuzz_$target.cpp" "${objects[@]}" -lfmt -pthread
done
for target in plan_json:plan config_json:config maps:maps; do
  name=${target%%:*} corpus=${target##*:}
  work=$(mktemp -d)
  cp tests/fuzz/corpus/"$corpus"/* "$work"/
  echo "fuzz_$name: ${seconds}s"
  if ! "$out/fuzz_$name" -max_total_time="$seconds" -max_len=4096 -artifact_prefix="$out/" "$work" >"$out/fuzz_$name.log" 2>&1; then
    tail -40 "$out/fuzz_$name.log"
    exit 1
  fi
  grep -E "^Done|#[0-9]+.*DONE" "$out/fuzz_$name.log" | tail -1
  rm -rf "$work"
done

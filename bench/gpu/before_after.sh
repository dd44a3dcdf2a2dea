#!/usr/bin/env bash
# Before/after on one GPU machine, in one run (a refactor must leave these within noise): builds the
# tree packed in deps/before.tar.gz (`git archive REV | gzip > deps/before.tar.gz` here) and this tree
# the same way, then runs, alternating before/after twice so drift hits both alike: the placement
# policy bench, the gloo exchange with two ranks sharing the GPU (DeepSeek-V3 expert size), and the
# one-rank serving loop (step cost quiet and while a rebalance runs). Results go to $OUT.
# usage: bench/gpu/before_after.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
prefix=/tmp/eplb-deps
python3 bench/gpu/unpack_debs.py deps/debs "$prefix" || exit 1
P=$prefix/usr
nccl_root=$(python3 -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])')
export CPLUS_INCLUDE_PATH=$P/include PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$nccl_root/lib:${LD_LIBRARY_PATH:-}

build_tree() {  # source-dir build-dir log
  meson setup "$2" "$1" -Dgloo_root="$P" -Dnccl_root="$nccl_root" -Dgpu_arch=9.0 -Dbuildtype=release >"$3" 2>&1 &&
    meson compile -C "$2" >>"$3" 2>&1 || { grep -E "error|FAILED" -A5 "$3" | head -40; return 1; }
}
rm -rf /tmp/before && mkdir -p /tmp/before && tar -xzf deps/before.tar.gz -C /tmp/before || exit 1
build_tree /tmp/before /tmp/before/build-gpu "$out/build-before.log" || exit 1
build_tree "$PWD" "$PWD/build-gpu" "$out/build-after.log" || exit 1

run_one() {  # variant build-dir round
  local tag="\"variant\": \"$1\", \"round\": $3"
  timeout 120 "$2/bench/policy_bench" --benchmark_filter='deepseek_v3$|qwen3_30b|min_move_deepseek_v3$' \
    --benchmark_format=json 2>/dev/null | python3 -c "
import json, sys
for b in json.load(sys.stdin)['benchmarks']:
    print(json.dumps({'variant': '$1', 'round': $3, 'bench': 'policy', 'name': b['name'], 'real_time': b['real_time'], 'unit': b['time_unit']}))"
  EPLB_SHARE_GPUS=1 python3 tests/comm/run_ranks.py "$2/bench/exchange_bench" 2 --deadline 120 -- \
    --backend gloo --label deepseek-v3 --expert-bytes 44040192 --moved 32 --reps 10 | grep '^{' | sed "s/^{/{$tag, /"
  python3 tests/comm/run_ranks.py "$2/bench/serving_bench" 1 --deadline 150 -- --label qwen3-30b-1rank \
    --async-backend gloo | grep '^{' | sed "s/^{/{$tag, /"
}
for round in 1 2; do
  run_one before /tmp/before/build-gpu "$round" | tee -a "$out/before_after.jsonl"
  run_one after "$PWD/build-gpu" "$round" | tee -a "$out/before_after.jsonl"
done

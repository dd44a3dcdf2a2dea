#!/usr/bin/env bash
# Everything a GPU machine runs in one call: build with CUDA, NCCL (pip wheel) and Gloo (from
# subprojects/, or EPLB_DEPS=debs: the carried Debian packages), run the gpu, multiproc and packaging
# test suites, then the benchmarks (limits, our exchange per backend, the PyTorch peer) in the same run. Results go to $OUT (or ./gpu-out).
# usage: bench/gpu/run.sh [tests|rearrange|serving|stepcost|bench|ipc|sweep|tune|all]
set -uo pipefail
cd "$(dirname "$0")/../.."
what=${1:-all}
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

nccl_root=$(python3 -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])')
export PATH=/usr/local/cuda/bin:$PATH
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc; ldd --version | head -1; g++ --version | head -1; meson --version
} 2>&1 | tee "$out/machine.txt"

# Dependencies the machine lacks (Gloo, nlohmann-json, CLI11; fmt and doctest where missing) come
# from subprojects/: local archives, nothing downloaded, Gloo built by CMake into libeplb.
# EPLB_DEPS=debs: the former way, Debian packages carried in deps/debs (bench/gpu/fetch_deps.sh)
# unpacked into a prefix, in build-gpu-debs.
if [ "${EPLB_DEPS:-subprojects}" = debs ]; then
  bd=build-gpu-debs
  prefix=/tmp/eplb-deps
  python3 bench/gpu/unpack_debs.py deps/debs "$prefix" || exit 1
  P=$prefix/usr
  export CPLUS_INCLUDE_PATH=$P/include
  setup_args=(-Dgloo_root="$P")
else
  bd=build-gpu
  setup_args=(--wrap-mode=nodownload -Dgloo=enabled)
fi
if [ ! -f $bd/build.ninja ]; then
  meson setup $bd "${setup_args[@]}" -Dnccl_root="$nccl_root" -Dgpu_arch=9.0 -Dbuildtype=release \
    >"$out/setup.log" 2>&1 || { tail -40 "$out/setup.log"; exit 1; }
fi
grep -A6 "Backends and parts" "$out/setup.log" || true
meson compile -C $bd >"$out/build.log" 2>&1 || { grep -E "error|FAILED" -A5 "$out/build.log" | head -60; exit 1; }
export LD_LIBRARY_PATH=$nccl_root/lib:${LD_LIBRARY_PATH:-}

if [ "$what" = tests ] || [ "$what" = all ]; then
  # The packaging suite's dlopen test also preloads PyTorch's libtorch_cpu.so (its own Gloo), RTLD_GLOBAL.
  EPLB_PRELOAD_LIBS=$(python3 -c 'import importlib.util, os; print(os.path.join(os.path.dirname(
    importlib.util.find_spec("torch").origin), "lib", "libtorch_cpu.so"))' 2>/dev/null) \
  meson test -C $bd ${TEST_SUITES:---suite gpu --suite multiproc --suite comm --suite packaging} --print-errorlogs >"$out/tests.log" 2>&1
  grep -E "^ *[0-9]+/[0-9]+ |^(Ok|Fail|Skipped|Timeout):" "$out/tests.log"
fi

if [ "$what" = sweep ]; then
  # Gloo staging parameters: lanes x chunk size on the DeepSeek-V3 exchange between 2 ranks.
  for lanes in 4 8 16; do
    for chunk in 8388608 16777216 33554432; do
      python3 tests/comm/run_ranks.py $bd/bench/exchange_bench 2 --deadline 300 -- \
        --backend gloo --label "sweep-l$lanes-c$chunk" --expert-bytes 44040192 --moved 32 --reps 4 \
        --lanes "$lanes" --chunk "$chunk" | grep '^{' | tee -a "$out/sweep.jsonl"
    done
  done
fi

if [ "$what" = rearrange ] || [ "$what" = all ]; then
  # Whole-model rearrangement, ours (nccl) and the PyTorch peer on the same maps:
  # name layers experts redundant expert-bytes: Qwen3-30B-A3B bf16 (48 x 128), DeepSeek-V3 fp8 (6 of 58 layers).
  ngpu=$(nvidia-smi -L | wc -l)
  # DeepSeek-V3: as many of its 58 layers as fit beside two staging areas (12 on 141 GB cards, 6 on 80 GB).
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  ds_layers=${DEEPSEEK_LAYERS:-$([ "$mem" -gt 100000 ] && echo 12 || echo 6)}
  for shape in "qwen3-30b 48 128 0 9437184" "deepseek-v3 $ds_layers 256 32 44040192"; do
    set -- $shape
    [ -z "${REARRANGE_ONLY:-}" ] || [ "$1" = "$REARRANGE_ONLY" ] || continue
    for ranks in 2 4; do
      [ "$ranks" -le "$ngpu" ] || continue
      for flags in "" "--register" "--no-pipeline" "--no-pipeline --no-coalesce" "--backend cuda_ipc"; do
        [ -z "${REARRANGE_FLAGS:-}" ] || [[ "$REARRANGE_FLAGS" == *"[$flags]"* ]] || continue
        python3 tests/comm/run_ranks.py $bd/bench/rearrange_bench "$ranks" --deadline 500 -- \
          --label "$1" --layers "$2" --experts "$3" --redundant "$4" --expert-bytes "$5" --reps 3 $flags \
          --maps-out /tmp/maps-$1-$ranks.json | grep -E '^\{|error' | tee -a "$out/rearrange.jsonl"
      done
      timeout 400 python3 bench/peers/torch_rearrange.py "$ranks" "$5" /tmp/maps-$1-$ranks.json 3 "$1" 2>&1 \
        | grep '^{' | tee -a "$out/rearrange.jsonl"
    done
  done
fi

if [ "$what" = serving ] || [ "$what" = all ]; then
  # Serving-loop stand-in with a full-model async rebalance behind it, then a sync one (Qwen3-30B-A3B
  # bf16 shape, 48 layers x 128 experts + 16 redundant).
  ngpu=$(nvidia-smi -L | wc -l)
  for ranks in 2 4; do
    [ "$ranks" -le "$ngpu" ] || continue
    # Entries: a backend, or gloo:TRANSPORT (gloo:tcp, gloo:shared_memory; plain gloo is auto).
    for ab in ${SERVING_BACKENDS:-gloo cuda_ipc}; do
      via=${ab#*:}; [ "$via" != "$ab" ] || via=auto
      python3 tests/comm/run_ranks.py $bd/bench/serving_bench "$ranks" --deadline 400 -- \
        --label qwen3-30b --async-backend "${ab%%:*}" --gloo-transport "$via" ${SERVING_ARGS:-} \
        | grep -E '^\{|error' | tee -a "$out/serving.jsonl"
    done
  done
fi

if [ "$what" = stepcost ] || [ "$what" = all ]; then
  # Issue 17: what step() costs when no rebalance is due, against the same loop without eplb, one
  # GPU (Qwen3-30B-A3B shape, 48 x 128 + 16; expert bytes do not matter in these steps): spin
  # forwards of 200 us and 2 ms, then the SGEMM + all-reduce forward.
  for fwd in 200 2000 0; do
    python3 tests/comm/run_ranks.py build-gpu/bench/serving_bench 1 --deadline 100 -- --label qwen3-30b-1rank \
      --phases quiet --forward-us "$fwd" --expert-bytes 65536 | grep -E '^\{|error' | tee -a "$out/stepcost.jsonl"
  done
fi

if [ "$what" = ipc ]; then
  # cuda_ipc against the NVLink limit, our nccl and the PyTorch peers (NCCL and the Gloo path vLLM
  # uses for async EPLB), same run, DeepSeek-V3 expert size.
  res=$out/ipc.jsonl
  $bd/bench/gpu_limits | tee -a "$res"
  for ranks in 4 2; do
    [ "$ranks" -le "$(nvidia-smi -L | wc -l)" ] || continue
    for backend in cuda_ipc nccl; do
      python3 tests/comm/run_ranks.py $bd/bench/exchange_bench "$ranks" --deadline 60 -- \
        --backend "$backend" --label deepseek-v3 --expert-bytes 44040192 --moved 32 --reps 10 \
        | grep -E '^\{|error' | tee -a "$res"
    done
    timeout 120 python3 bench/peers/torch_exchange.py "$ranks" 44040192 32 3 deepseek-v3 2>&1 | grep '^{' | tee -a "$res"
  done
fi

if [ "$what" = tune ]; then
  # NCCL's point-to-point knobs on the DeepSeek-V3 exchange (one environment per line of TUNE_ENVS,
  # the first one NCCL's defaults), then the rearrangement for the lines of TUNE_REARRANGE
  # ("environment | rearrange_bench flags") and the PyTorch peer on the same maps.
  res=$out/tune.jsonl
  ngpu=$(nvidia-smi -L | wc -l)
  default_envs=$'\nNCCL_P2P_NVL_CHUNKSIZE=1048576\nNCCL_P2P_NVL_CHUNKSIZE=4194304\nNCCL_MIN_NCHANNELS=32\nNCCL_MIN_P2P_NCHANNELS=32 NCCL_MAX_P2P_NCHANNELS=32\nNCCL_NTHREADS=512\nNCCL_P2P_USE_CUDA_MEMCPY=1\nNCCL_PROTO=Simple'
  for ranks in ${TUNE_RANKS:-4 2}; do
    [ "$ranks" -le "$ngpu" ] || continue
    while IFS= read -r envs; do
      env $envs python3 tests/comm/run_ranks.py $bd/bench/exchange_bench "$ranks" --deadline 60 -- \
        --backend nccl --label "deepseek-v3 [${envs}]" --expert-bytes 44040192 --moved 32 --reps 10 \
        | grep -E '^\{|error' | tee -a "$res"
    done <<<"${TUNE_ENVS:-$default_envs}"
    [ -n "${TUNE_REARRANGE:-}" ] || continue
    layers=${DEEPSEEK_LAYERS:-6}
    while IFS='|' read -r envs flags; do
      env $envs python3 tests/comm/run_ranks.py $bd/bench/rearrange_bench "$ranks" --deadline 300 -- \
        --label "deepseek-v3 [${envs}] [${flags}]" --layers "$layers" --experts 256 --redundant 32 \
        --expert-bytes 44040192 --reps 3 $flags --maps-out /tmp/maps-tune-$ranks.json | grep -E '^\{|error' | tee -a "$res"
    done <<<"$TUNE_REARRANGE"
    timeout 300 python3 bench/peers/torch_rearrange.py "$ranks" 44040192 /tmp/maps-tune-$ranks.json 3 deepseek-v3 2>&1 \
      | grep '^{' | tee -a "$res"
  done
fi

if [ "$what" = bench ] || [ "$what" = all ]; then
  res=$out/bench.jsonl
  : >"$res"
  ngpu=$(nvidia-smi -L | wc -l)
  $bd/bench/gpu_limits | tee -a "$res"
  # The host's loopback TCP ceiling for Gloo's traffic between 2 and 4 ranks of this host, with the
  # lane count gloo picks by itself here (communicator options, lanes = 0).
  for ranks in 2 4; do
    lanes=$(( $(nproc) * 2 < 64 ? $(nproc) * 2 : 64 )); lanes=$(( lanes / (ranks - 1) ))
    lanes=$(( lanes < 2 ? 2 : (lanes > 16 ? 16 : lanes) ))
    timeout 120 $bd/bench/tcp_limit --ranks "$ranks" --lanes "$lanes" | tee -a "$res"
  done
  # name expert-bytes experts-moved-per-rank: Qwen3-30B-A3B bf16, Qwen3-235B-A22B bf16, DeepSeek-V3 fp8.
  for shape in "qwen3-30b 9437184 16" "qwen3-235b 37748736 16" "deepseek-v3 44040192 32"; do
    set -- $shape
    for ranks in 2 4; do
      # EPLB_SHARE_GPUS=1: ranks share the GPUs there are (a proxy for the staged paths on fewer GPUs).
      [ "$ranks" -le "$ngpu" ] || [ -n "${EPLB_SHARE_GPUS:-}" ] || continue
      for backend in nccl gloo "gloo --gloo-transport tcp" cuda_ipc "cuda_ipc --pull"; do
        [ -z "${BACKENDS:-}" ] || [[ " $BACKENDS " == *" ${backend%% *} "* ]] || continue
        python3 tests/comm/run_ranks.py $bd/bench/exchange_bench "$ranks" --deadline 300 -- \
          --backend $backend --label "$1" --expert-bytes "$2" --moved "$3" --reps 10 \
          | grep -E '^\{|error' | tee -a "$res"
      done
      timeout 300 python3 bench/peers/torch_exchange.py "$ranks" "$2" "$3" 9 "$1" 2>&1 | grep '^{' | tee -a "$res"
    done
  done
fi

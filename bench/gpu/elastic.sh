#!/usr/bin/env bash
# Elastic EP on a GPU machine (issue 20): `eplb simulate` with weights in device memory, ranks as Gloo
# processes sharing the GPUs there are (rank % GPUs). A scale-down and scale-up, and a rank that
# SIGKILLs itself with the others serving on (with and without a checkpoint), sync and async. Every
# run verifies every committed layer on every rank; the JSON reports go to $OUT/elastic-*.json and
# one summary line each to stdout. Needs build-gpu (bench/gpu/run.sh builds it).
# usage: bench/gpu/elastic.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
nccl_root=$(python3 -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_root:+$nccl_root/lib:}${LD_LIBRARY_PATH:-}
eplb=build-gpu/src/eplb
common=(--device ${EPLB_ELASTIC_DEVICE:-cuda} --procs --backend gloo --ranks 8 --steps 300 --step-interval 40 --window 20 --timeout-ms 3000)

run() {  # name args...
  local name=$1
  shift
  timeout 240 "$eplb" simulate --json "${common[@]}" "$@" >"$out/elastic-$name.json" 2>"$out/elastic-$name.err"
  echo "rc=$?" >>"$out/elastic-$name.err"
  python3 - "$name" "$out/elastic-$name.json" <<'EOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    d = json.load(open(path))
except Exception as e:  # noqa: BLE001
    print(f"{name}: no report ({e})")
    sys.exit(0)
sets = [{k: s.get(k) for k in ("step", "num_ranks", "lost_ranks", "seconds", "experts_reloaded") if k in s}
        | ({"masked": len(s["masked"])} if s.get("masked") else {}) for s in d.get("rank_sets", [])]
print(json.dumps({"run": name, "failure": d.get("failure"), "verified": d.get("verified"),
                  "same_commit_steps": d.get("commit_steps_consistent"), "rebalances": d.get("rebalances"),
                  "rank_sets": sets}))
EOF
}

for mode in async sync; do
  flag=()
  [ "$mode" = sync ] && flag=(--sync)
  run "scale-$mode" --scale 100:6,200:9 "${flag[@]}"
  run "survive-$mode" --fail-rank 1 --fail-step 100 --survive "${flag[@]}"
  run "survive-no-reload-$mode" --fail-rank 1 --fail-step 100 --survive --no-reload "${flag[@]}"
done

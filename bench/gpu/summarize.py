#!/usr/bin/env python3
"""Turns bench.jsonl lines (from bench/gpu/run.sh) into the markdown rows of bench/RESULTS.md.

For every shape and rank count: GB/s per rank (mean over ranks) for each implementation, and the
ratios of ours to the PyTorch peer and to the measured limits."""
import collections
import json
import sys

def objects(text):
    # Ranks print concurrently, so one line may hold several JSON objects.
    dec, i = json.JSONDecoder(), 0
    while (i := text.find("{", i)) >= 0:
        obj, end = dec.raw_decode(text, i)
        yield obj
        i = end


rows = list(objects(open(sys.argv[1]).read()))
limits = {r["path"]: r["gbps"] for r in rows if r["bench"] == "limit"}
ex = collections.defaultdict(list)
for r in rows:
    if r["bench"] == "exchange":
        ex[(r["label"], r["ranks"], r["backend"])].append(r)

tcp = {r["ranks"]: r["gbps"] for r in rows if r["bench"] == "limit" and r["path"].startswith("tcp_loopback")}
print("| shape | ranks | MB moved per rank | eplb nccl | torch nccl | nccl ratio | eplb gloo | torch gloo | gloo ratio | "
      "eplb nccl / NVLink limit | eplb gloo / PCIe D2H limit | eplb gloo / loopback TCP limit | eplb gloo shm | gloo shm ratio | "
      "gloo shm / PCIe D2H limit | eplb cuda_ipc | cuda_ipc / NVLink limit |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (label, ranks) in sorted({(k[0], k[1]) for k in ex}, key=lambda x: (x[0], x[1])):
    def gbps(backend):
        v = ex.get((label, ranks, backend))
        return sum(r["gbps"] for r in v) / len(v) if v else float("nan")
    any_row = next(r for k, v in ex.items() if k[:2] == (label, ranks) for r in v)
    mb = any_row["expert_bytes"] * any_row["moved"] / 1e6
    n, tn, g, tg, ipc = gbps("nccl"), gbps("torch_nccl"), gbps("gloo"), gbps("torch_gloo"), gbps("cuda_ipc")
    shm = gbps("gloo-shm")
    d2h = limits.get("d2h_pinned", float("nan"))
    nvlink = limits.get("peer_0_to_1", float("nan"))
    print(f"| {label} | {ranks} | {mb:.0f} | {n:.1f} | {tn:.1f} | {n / tn:.2f}x | {g:.2f} | {tg:.2f} | {g / tg:.2f}x | "
          f"{n / nvlink:.2f} | {g / limits.get('d2h_pinned', float('nan')):.3f} | "
          f"{g / tcp.get(ranks, float('nan')):.2f} | {shm:.2f} | {shm / tg:.2f}x | {shm / d2h:.3f} | "
          f"{ipc:.1f} | {ipc / nvlink:.2f} |")
print()
print("limits (GB/s): " + ", ".join(f"{k} {v}" for k, v in limits.items()))

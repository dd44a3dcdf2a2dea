#!/usr/bin/env python3
"""Ranks on different hosts, simulated with Linux network namespaces.

usage: netns_hosts.py EPLB COMM_RANK

Each rank runs in its own network namespace ("host") with one interface, eth0, address 10.77.0.R+1;
the eth0s are veth pairs whose other ends are ports of a bridge in a further namespace (a direct veth
pair between two namespaces where bridges are unavailable). A rank's 127.0.0.1 is not reachable from
another namespace, so everything between ranks -- the TCP store (served by rank 0 on 10.77.0.1) and
every Gloo connection (each rank listens on its own address, --hostname) -- crosses the veth links,
which the interface byte counters confirm. Cases:

  1. the Gloo conformance driver (tests/comm/comm_rank), plain and staged with 3 lanes;
  2. `eplb exchange --backend gloo --rank R`: random placements, every byte verified after each layer;
  3. `eplb simulate --backend gloo --rank R` (async rebalances): every committed layer verified on
     every rank, commits in the same steps everywhere;
  4. cases 1 and 2 again with netem delay 20 ms and loss 1% on every link, only where the kernel has
     the netem qdisc (otherwise a note says they were skipped);
  5. the link of rank 1 goes down mid-exchange (`ip link set eth0 down`): both ranks must exit with
     an error naming the other within twice the timeout, and not hang.

Exit 77 (skip) when not root or when network namespaces cannot be created. The namespaces are always
deleted, also on failure or SIGTERM."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SKIP = 77
TAG = f"eplb{os.getpid()}"
BRIDGE_NS = f"{TAG}-sw"
PORT = 29517
failures = []
namespaces = []  # created so far, deleted in finally
children = []  # running rank processes, killed in finally


def ns(rank):
    return f"{TAG}-h{rank}"


def addr(rank):
    return f"10.77.0.{rank + 1}"


def ip(*args, check=True):
    res = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def add_namespace(name):
    ip("netns", "add", name)
    namespaces.append(name)
    ip("-n", name, "link", "set", "lo", "up")


def build_hosts(count):
    """`count` host namespaces on a bridge; falls back to a veth pair between two hosts."""
    for r in range(count):
        add_namespace(ns(r))
    add_namespace(BRIDGE_NS)
    bridged = ip("-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge", check=False).returncode == 0
    if bridged:
        ip("-n", BRIDGE_NS, "link", "set", "br0", "up")
        for r in range(count):
            ip("link", "add", "eth0", "netns", ns(r), "type", "veth", "peer", "name", f"p{r}", "netns", BRIDGE_NS)
            ip("-n", BRIDGE_NS, "link", "set", f"p{r}", "master", "br0")
            ip("-n", BRIDGE_NS, "link", "set", f"p{r}", "up")
    else:
        print("NOTE: no bridge support here: two hosts joined by one veth pair")
        count = 2
        ip("link", "add", "eth0", "netns", ns(0), "type", "veth", "peer", "name", "eth0", "netns", ns(1))
    for r in range(count):
        ip("-n", ns(r), "addr", "add", f"{addr(r)}/24", "dev", "eth0")
        ip("-n", ns(r), "link", "set", "eth0", "up")
    print(f"{count} hosts: " + ", ".join(f"{ns(r)} {addr(r)}" for r in range(count)) +
          (f" on bridge {BRIDGE_NS}/br0" if bridged else " (veth pair)"))
    return count


def eth0_bytes(rank):
    stats = json.loads(ip("-n", ns(rank), "-s", "-j", "link", "show", "eth0").stdout)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def store_spec(rank, port):
    return f"tcp-serve:{addr(0)}:{port}" if rank == 0 else f"tcp:{addr(0)}:{port}"


def start(rank, cmd):
    p = subprocess.Popen(["ip", "netns", "exec", ns(rank), *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    children.append(p)
    return p


def finish(procs, deadline_s):
    """Waits for every process; returns [(exit code or 'hang', output)]."""
    end = time.monotonic() + deadline_s
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(0.1, end - time.monotonic()))
            out.append((p.returncode, text))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            out.append(("hang", text))
    return out


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail and not ok else ""))
    if not ok:
        failures.append(f"{name}: {detail}")


def traffic_check(name, before, ranks, at_least):
    """Every rank's eth0 carried at least `at_least[r]` bytes in and something out since `before`."""
    for r in range(ranks):
        rx, tx = eth0_bytes(r)
        got = rx - before[r][0]
        check(f"{name}: rank {r} traffic crossed eth0", got >= at_least[r] and tx > before[r][1],
              f"eth0 received {got} bytes, sent {tx - before[r][1]}, expected >= {at_least[r]} received")


def conformance(comm_rank, ranks, port, label, extra):
    before = [eth0_bytes(r) for r in range(ranks)]
    procs = [
        start(r, [comm_rank, "--rank", str(r), "--size", str(ranks), "--store", store_spec(r, port), "--hostname",
                  addr(r), "--backend", "gloo", "--timeout-ms", "20000", *extra]) for r in range(ranks)
    ]
    results = finish(procs, 120)
    for r, (code, text) in enumerate(results):
        check(f"{label}: rank {r} conformance", code == 0 and "conformance ok" in text, f"exit {code}\n{text}")
    traffic_check(label, before, ranks, [1] * ranks)


def exchange(eplb, tmp, ranks, port, label, rounds=6):
    before = [eth0_bytes(r) for r in range(ranks)]
    files = [os.path.join(tmp, f"{label.replace(' ', '_')}-{r}") for r in range(ranks)]
    procs = [
        start(r, [eplb, "exchange", "--backend", "gloo", "--ranks", str(ranks), "--layers", "3", "--experts", "10",
                  "--redundant", "2", "--tensor-bytes", "65536,1000,4", "--rounds", str(rounds), "--timeout-ms",
                  "20000", "--rank", str(r), "--store", store_spec(r, port), "--hostname", addr(r), "--result",
                  files[r]]) for r in range(ranks)
    ]
    results = finish(procs, 120)
    received = []
    for r, (code, text) in enumerate(results):
        try:
            with open(files[r]) as f:
                head, failure = (f.read().split("\n", 1) + [""])[:2]
            verified, done, moved = head.split()[:3]
        except (OSError, ValueError):
            verified, done, moved, failure = "0", "0", "0", f"no result file (exit {code})\n{text}"
        received.append(int(moved))
        check(f"{label}: rank {r} every byte verified", code == 0 and verified == "1" and int(done) == rounds,
              f"exit {code}, verified {verified}, rounds {done}/{rounds}: {failure.strip()}\n{text}")
    traffic_check(label, before, ranks, received)


def simulate(eplb, tmp, port):
    ranks = 2  # the tiny preset's 20 slots: 2 or 4 ranks
    before = [eth0_bytes(r) for r in range(ranks)]
    files = [os.path.join(tmp, f"simulate-{r}.json") for r in range(ranks)]
    procs = [
        start(r, [eplb, "simulate", "--backend", "gloo", "--async", "--ranks", str(ranks), "--steps", "300",
                  "--timeout-ms", "20000", "--rank", str(r), "--store", store_spec(r, port), "--hostname", addr(r),
                  "--result", files[r], "--json"]) for r in range(ranks)
    ]
    results = finish(procs, 120)
    reports = []
    for r, (code, text) in enumerate(results):
        try:
            with open(files[r]) as f:
                reports.append(json.load(f))
        except (OSError, ValueError):
            reports.append({})
        rep = reports[-1]
        check(f"simulate: rank {r} every committed layer verified",
              code == 0 and rep.get("verified") is True and not rep.get("failure"),
              f"exit {code}, failure {rep.get('failure')!r}\n{text}")
    commits = [rep.get("commits") for rep in reports]
    check("simulate: rebalances committed, in the same steps on both ranks",
          bool(commits[0]) and all(c == commits[0] for c in commits), f"commits per rank: {commits}")
    traffic_check("simulate", before, ranks, [r.get("bytes_moved", 1) for r in reports])


def try_netem(ranks):
    for r in range(ranks):
        res = subprocess.run(["tc", "-n", ns(r), "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "20ms",
                              "loss", "1%"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0:
            for k in range(r):
                subprocess.run(["tc", "-n", ns(k), "qdisc", "del", "dev", "eth0", "root"], stderr=subprocess.DEVNULL)
            return res.stdout.strip()
    return ""


def link_down(eplb, tmp, port):
    """Rank 1's link goes down mid-exchange: both ranks fail naming the other within 2x the timeout."""
    timeout_ms = 3000
    files = [os.path.join(tmp, f"linkdown-{r}") for r in range(2)]
    procs = [
        start(r, [eplb, "exchange", "--backend", "gloo", "--ranks", "2", "--layers", "4", "--experts", "14",
                  "--redundant", "2", "--tensor-bytes", "262144,4096", "--rounds", "1000000", "--timeout-ms",
                  str(timeout_ms), "--rank", str(r), "--store", store_spec(r, port), "--hostname", addr(r),
                  "--result", files[r]]) for r in range(2)
    ]
    # Wait until data flows over the link, then a little more.
    rx0 = eth0_bytes(0)[0]
    end = time.monotonic() + 20
    while time.monotonic() < end and eth0_bytes(0)[0] - rx0 < 4 << 20 and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    time.sleep(0.5)
    if any(p.poll() is not None for p in procs):
        check("link down: exchange still running when the link goes down", False,
              "; ".join(f"rank {r} exit {code}: {text}" for r, (code, text) in enumerate(finish(procs, 5))))
        return
    ip("-n", ns(1), "link", "set", "eth0", "down")
    down = time.monotonic()
    exited = [None, None]
    while time.monotonic() - down < 2 * timeout_ms / 1000 + 10 and None in exited:
        for r, p in enumerate(procs):
            if exited[r] is None and p.poll() is not None:
                exited[r] = time.monotonic() - down
        time.sleep(0.02)
    results = finish(procs, 0.1)
    ip("-n", ns(1), "link", "set", "eth0", "up")
    for r, (code, text) in enumerate(results):
        peer = 1 - r
        try:
            with open(files[r]) as f:
                failure = (f.read().split("\n", 1) + [""])[1].strip()
        except OSError:
            failure = ""
        took = exited[r]
        check(f"link down: rank {r} did not hang", code != "hang", text)
        check(f"link down: rank {r} exited within 2 x {timeout_ms} ms",
              took is not None and took <= 2 * timeout_ms / 1000, f"exited after {took} s (None: still running)")
        check(f"link down: rank {r} reports an error naming rank {peer}",
              code not in (0, "hang") and f"rank {peer}" in failure, f"exit {code}, failure {failure!r}\n{text}")
        if took is not None:
            print(f"     rank {r}: exit {code} after {took:.2f} s: {failure}")


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    eplb, comm_rank = (os.path.abspath(a) for a in sys.argv[1:3])
    if os.geteuid() != 0:
        print("skip: network namespaces need root")
        return SKIP
    if shutil.which("ip") is None:
        print("skip: the ip command (iproute2) is not installed")
        return SKIP
    probe = subprocess.run(["ip", "netns", "add", f"{TAG}-probe"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    if probe.returncode != 0:
        print(f"skip: ip netns is unavailable here: {probe.stdout.strip()}")
        return SKIP
    ip("netns", "del", f"{TAG}-probe", check=False)
    tmp = tempfile.mkdtemp(prefix="eplb-netns-")
    try:
        try:
            hosts = build_hosts(3)
        except RuntimeError as e:
            print(f"skip: cannot build the namespaces' network here: {e}")
            return SKIP
        port = PORT
        conformance(comm_rank, hosts, port, "gloo conformance", ["--rounds", "4", "--seed", "5"])
        conformance(comm_rank, hosts, port + 1, "gloo conformance staged",
                    ["--staged", "--rounds", "4", "--lanes", "3", "--staging-bytes", "40000", "--seed", "15"])
        exchange(eplb, tmp, hosts, port + 2, "exchange")
        simulate(eplb, tmp, port + 3)
        why = try_netem(hosts)
        if why:
            print(f"NOTE: netem is not available in this kernel ({why}); the delay and loss runs are skipped, "
                  "the runs above had no netem")
        else:
            print("netem: delay 20 ms, loss 1% on every host's eth0")
            conformance(comm_rank, hosts, port + 4, "gloo conformance netem", ["--rounds", "2", "--seed", "25"])
            exchange(eplb, tmp, hosts, port + 5, "exchange netem", rounds=3)
            for r in range(hosts):
                subprocess.run(["tc", "-n", ns(r), "qdisc", "del", "dev", "eth0", "root"], stderr=subprocess.DEVNULL)
        link_down(eplb, tmp, port + 6)
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
        for name in reversed(namespaces):
            ip("netns", "del", name, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


def on_sigterm(signum, frame):
    raise SystemExit(f"netns_hosts: terminated by signal {signum}")  # runs the finally: namespaces deleted


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    sys.exit(main())

#!/usr/bin/env python3
"""`eplb simulate --report FILE.html --jsonl FILE` (issue 21, item 2): the page is self-contained
(no scripts, no network), holds every chart with data in it, marks rebalances and errors; the JSONL
file has one record per step and rank and one per rebalance and rank. When a Chromium is given the
page is rendered headless: the screenshot must show the charts' colours and the DOM their elements.
usage: test_report.py EPLB [CHROMIUM]"""
import html.parser
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

eplb = sys.argv[1]
chromium = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
failures = []


def expect(cond, what):
    if not cond:
        failures.append(what)


class page_parser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.svgs, self.tags, self.markers, self.points, self.external = [], {}, 0, {}, []
        self.current = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "svg":
            self.current = a.get("id")
            self.svgs.append(self.current)
        if tag == "line" and a.get("class") == "marker":
            self.markers += 1
        if tag == "polyline":
            self.points.setdefault(self.current, []).append(len(a.get("points", "").split()))
        for k, v in a.items():
            if k in ("src", "href") and v:
                self.external.append(v)


work = tempfile.mkdtemp(prefix="eplb-report-")
page, lines = os.path.join(work, "run.html"), os.path.join(work, "run.jsonl")
steps, ranks = 1200, 4
args = ["simulate", "--json", "--steps", str(steps), "--sync", "--report", page, "--jsonl", lines,
        "--transfer-fault-rank", "2", "--transfer-fault-step", "300"]
r = subprocess.run([eplb, *args], capture_output=True, text=True, timeout=300)
out = json.loads(r.stdout) if r.stdout.startswith("{") else {}
expect(os.path.exists(page) and out, f"no report: exit {r.returncode} {r.stderr[-500:]}")
text = open(page).read() if os.path.exists(page) else ""

p = page_parser()
p.feed(text)
want = ["global-balancedness", "rank-load", "worst-layer-1", "bytes-moved", "step-times"]
expect(all(w in p.svgs for w in want), f"charts: have {p.svgs}, want {want}")
expect("script" not in p.tags and not p.external, f"not self-contained: {p.tags.get('script')} {p.external}")
samples = len(out.get("series", {}).get("steps", []))
expect(samples >= 10 and p.points.get("global-balancedness") == [samples], f"global line: {p.points} {samples}")
expect(p.points.get("rank-load") == [samples] * ranks, f"one line per rank: {p.points.get('rank-load')}")
errors = [f for f in out.get("failures", []) if f.get("step", -1) >= 0]
expect(len(errors) >= 1, f"the transfer fault must be reported: {out.get('failures')}")
# Both balancedness charts mark every rebalance and every error step.
expect(p.markers == 2 * (out.get("rebalances", 0) + len(errors)), f"markers: {p.markers} for {out.get('rebalances')} "
       f"rebalances and {len(errors)} errors")
expect(p.tags.get("rect", 0) > 20, f"bars missing: {p.tags.get('rect')}")
g = out.get("series", {}).get("global_balancedness", [])
expect(g and all(0 < v <= 1 for v in g) and max(g[len(g) // 2:]) > g[0],
       f"global balancedness should rise after rebalancing: {g[:3]}...{g[-3:]}")

records = [json.loads(line) for line in open(lines)] if os.path.exists(lines) else []
kinds = {}
for rec in records:
    kinds[rec["type"]] = kinds.get(rec["type"], 0) + 1
expect(kinds.get("step") == steps * ranks, f"step records: {kinds}")
expect(kinds.get("rebalance") == ranks * out.get("rebalances", -1), f"rebalance records: {kinds} {out.get('rebalances')}")
expect(kinds.get("error", 0) == len(errors), f"error records: {kinds} vs {len(errors)}")

# An unwritable --report is bad input, found before any rank starts.
r = subprocess.run([eplb, "simulate", "--report", "/nonexistent/x.html"], capture_output=True, text=True, timeout=30)
expect(r.returncode == 2 and "--report /nonexistent/x.html: cannot open for writing" in r.stderr, f"{r.stderr}")


def png_colours(path):
    """The set of RGB colours of a PNG (8-bit RGB or RGBA, as Chromium writes), decoded here."""
    data = open(path, "rb").read()
    pos, idat, width, height, channels = 8, b"", 0, 0, 4
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            channels = {2: 3, 6: 4}[colour]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, prev, colours = zlib.decompress(idat), width * channels, bytearray(width * channels), set()
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        for x in range(0, stride, channels * 2):
            colours.add(tuple(line[x:x + 3]))
        prev = line
    return width, height, colours


if chromium:
    shot = os.path.join(work, "run.png")
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    r = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1000,2600", "file://" + page],
                       capture_output=True, text=True, timeout=120)
    expect(os.path.exists(shot), f"no screenshot: {r.returncode} {r.stderr[-500:]}")
    if os.path.exists(shot):
        w, h, colours = png_colours(shot)
        # The global line (#1f77b4), the bars before/after (#d62728, #2ca02c) were drawn.
        for name, rgb in (("blue line", (0x1f, 0x77, 0xb4)), ("red bars", (0xd6, 0x27, 0x28)),
                          ("green bars", (0x2c, 0xa0, 0x2c))):
            expect(rgb in colours, f"screenshot {w}x{h} lacks the {name} {rgb}")
        print(f"screenshot: {shot} ({w}x{h}, {len(colours)} colours)")
    r = subprocess.run([*base, "--dump-dom", "file://" + page], capture_output=True, text=True, timeout=120)
    dom = page_parser()
    dom.feed(r.stdout)
    expect(all(w in dom.svgs for w in want), f"rendered DOM lacks charts: {dom.svgs}")
else:
    print("no Chromium given: the page was checked without rendering it")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print(f"report: all checks passed ({len(text)} bytes of HTML, {len(records)} JSONL records, in {work})")

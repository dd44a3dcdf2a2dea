#!/usr/bin/env python3
"""libeplb as a library that loads anywhere (issue 18, item 4): checks the built shared library and
the generated pkg-config file.

usage: check_library.py LIBEPLB_SO VERSION INCLUDE_DIR EPLB_PC

- Dynamic symbols: every defined one is eplb's (eplb::..., its typeinfo, vtables; the version node
  EPLB_0). Boost, nlohmann, Gloo, fmt, CLI11 or std symbols exported from libeplb would bind to (or
  be bound by) another copy of the same code in the process: PyTorch's Gloo, another Asio.
- SONAME is libeplb.so.MAJOR.
- Every function declared (not defined) in include/eplb is exported: a declaration without EPLB_API
  would compile in a consumer and fail at its link (found with universal-ctags).
- eplb.pc: no -std flag and no absolute path in Cflags or Libs (consumers choose their standard,
  C++20 or later; the library's own dependencies are found through its DT_NEEDED)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

EPLB_PREFIXES = ("eplb::", "typeinfo for eplb::", "typeinfo name for eplb::", "vtable for eplb::",
                 "VTT for eplb::", "non-virtual thunk to eplb::", "virtual thunk to eplb::")


def dynamic_symbols(lib):
    out = subprocess.run(["nm", "-DC", "--defined-only", lib], check=True, capture_output=True, text=True).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            names.append(re.sub(r"@@?EPLB_0$", "", parts[2]))
    return names


def check_symbols(names):
    foreign = [n for n in names if n != "EPLB_0" and not n.startswith(EPLB_PREFIXES)]
    if not foreign:
        return []
    groups = {}
    for n in foreign:
        key = re.sub(r"^(typeinfo name for|typeinfo for|vtable for|VTT for|guard variable for) ", "", n)
        key = re.split(r"::|<|\(", key, maxsplit=1)[0]
        groups.setdefault(key, []).append(n)
    summary = ", ".join(f"{k}: {len(v)}" for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1])))
    examples = "\n  ".join(foreign[:8])
    return [f"{len(foreign)} of {len(names)} dynamic symbols are not eplb's ({summary}); e.g.\n  {examples}"]


def check_soname(lib, version):
    out = subprocess.run(["readelf", "-d", lib], check=True, capture_output=True, text=True).stdout
    m = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", out)
    want = f"libeplb.so.{version.split('.')[0]}"
    got = m.group(1) if m else None
    return [] if got == want else [f"SONAME is {got}, expected {want}"]


def declared_functions(include_dir):
    """(scope, name) of every function declared but not defined in the public headers."""
    out = subprocess.run(["ctags", "--output-format=json", "--languages=C++", "--kinds-C++=+p", "-f", "-",
                          "--fields=+{scope}{kind}", "--fields-C++=+{properties}", "-R", include_dir],
                         check=True, capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        tag = json.loads(line)
        if tag.get("_type") != "tag" or tag.get("kind") != "prototype":
            continue
        props = set(tag.get("properties", "").split(","))
        if props & {"pure", "delete", "default"}:
            continue
        found.add((tag.get("scope", ""), tag["name"]))
    return sorted(found)


def check_exported(names, include_dir):
    if shutil.which("ctags") is None:  # universal-ctags: ./dev installs it; GPU machines lack it
        print("note: no ctags here, the check that every declared function is exported is skipped")
        return []
    # A function returning std::string demangles with an ABI tag: name[abi:cxx11](...).
    exported = {re.sub(r"\[abi:\w+\]$", "", n.split("(", 1)[0]) for n in names if n.startswith("eplb::")}
    missing = [f"{scope}::{name}" for scope, name in declared_functions(include_dir)
               if f"{scope}::{name}" not in exported]
    if not missing:
        return []
    return [f"{len(missing)} functions declared in include/eplb are not exported (EPLB_API missing on the "
            f"declaration or its class?): " + ", ".join(missing)]


def check_pc(pc):
    problems = []
    for line in Path(pc).read_text().splitlines():
        key, _, value = line.partition(":")
        if key not in ("Cflags", "Libs", "Libs.private"):
            continue
        if "-std=" in value:
            problems.append(f"{Path(pc).name}: {key} forces a language standard: {value.strip()}")
        for word in value.split():
            path = re.sub(r"^-(L|I|Wl,-rpath,)", "", word)
            if path.startswith("/"):
                problems.append(f"{Path(pc).name}: {key} carries an absolute path: {word}")
    return problems


def main():
    lib, version, include_dir, pc = sys.argv[1:5]
    names = dynamic_symbols(lib)
    problems = check_symbols(names) + check_soname(lib, version) + check_exported(names, include_dir) + check_pc(pc)
    for p in problems:
        print("FAIL:", p)
    print(f"{len(names)} dynamic symbols, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

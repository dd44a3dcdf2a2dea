#!/usr/bin/env python3
"""Size limits of the source tree (issue 16): no function in src/ longer than 60 lines, no file
longer than 600. Functions are found by universal-ctags (line: and end: of every function
definition in every .cpp/.hpp/.cu file). Exceptions, while someone shrinks them, are listed in an
allow-list file, one per line:

    path:function max_lines     a function of that name in that file may have up to max_lines
    path max_lines              the file may have up to max_lines

Paths are relative to the repository root; '#' starts a comment. Entries that no longer match an
offender are reported as notes (the list can shrink), not failures.

Usage:
    check_sizes.py [--root DIR] [--allowlist FILE]   check DIR/src (default: this repository's)
    check_sizes.py --self-test                       prove on generated files that offenders are found

Exit status: 0 within the limits, 1 with offenders (listed), 77 (skip) without universal-ctags.
"""

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

FUNCTION_LIMIT = 60
FILE_LIMIT = 600
EXTENSIONS = (".cpp", ".hpp", ".cu")
SKIP = 77


def find_ctags():
    """The universal-ctags program, or None (missing, or another ctags: exuberant, etags)."""
    ctags = shutil.which("ctags")
    if ctags is None:
        return None
    try:
        version = subprocess.run([ctags, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return ctags if "Universal Ctags" in version else None


def functions(ctags, path):
    """(name, first line, length) of every function defined in `path`. A lambda, which ctags
    tags as __anon..., is named after the function that holds it."""
    out = subprocess.run(
        [ctags, "--language-force=C++", "--c++-kinds=f", "--fields=+ne", "--sort=no", "-o", "-", str(path)],
        capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split("\t")
        extra = {}
        for field in fields[3:]:
            key, _, value = field.partition(":")
            extra[key] = value
        if "line" not in extra or "end" not in extra:
            continue
        name = fields[0]
        if name.startswith("__anon"):
            holder = extra.get("function", "").split("::")[-1]
            name = f"<lambda in {holder}>"
        first, last = int(extra["line"]), int(extra["end"])
        found.append((name, first, last - first + 1))
    return found


def line_count(path):
    data = path.read_bytes()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def read_allowlist(path):
    """{key: max_lines}; key is 'path' or 'path:function'."""
    allowed = {}
    if path is None:
        return allowed
    for number, raw in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise SystemExit(f"{path}:{number}: expected 'path[:function] max_lines', got {raw!r}")
        allowed[parts[0]] = int(parts[1])
    return allowed


def sources(root):
    src = root / "src"
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in EXTENSIONS)


def check(root, allowed, ctags):
    """(offenders, notes): lines naming what is over its limit, and allow-list entries not needed."""
    offenders, largest = [], {}  # largest: the biggest item each allow-list entry matched

    def over(key, size, limit, what):
        cap = allowed.get(key)
        if cap is not None:
            largest[key] = max(size, largest.get(key, 0))
            if size <= cap:
                return
            offenders.append(f"{what}: {size} lines, over its allow-list entry of {cap}")
        elif size > limit:
            offenders.append(f"{what}: {size} lines (limit {limit})")

    for path in sources(root):
        rel = path.relative_to(root).as_posix()
        over(rel, line_count(path), FILE_LIMIT, rel)
        for name, first, length in functions(ctags, path):
            over(f"{rel}:{name}", length, FUNCTION_LIMIT, f"{rel}:{first}: {name}")
    notes = [f"allow-list entry {key} is no longer needed (within the limit or gone)" for key in sorted(allowed)
             if largest.get(key, 0) <= (FUNCTION_LIMIT if ":" in key else FILE_LIMIT)]
    return offenders, notes


def function_text(name, total_lines):
    """A C++ function definition of exactly `total_lines` lines."""
    body = "".join(f"  x += {i};\n" for i in range(total_lines - 3))
    return f"int {name}(int x) {{\n{body}  return x;\n}}\n"


def self_test(ctags):
    """The checker on generated files: a 61-line function and a 601-line file are offenders, a
    60-line function and a 600-line file are not, and allow-list entries excuse them up to their
    cap. Fails loudly, so the real check cannot pass by finding nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        (root / "src" / "sub").mkdir(parents=True)
        text = function_text("sixty_one", 61) + function_text("sixty", 60)
        (root / "src" / "sub" / "long.cpp").write_text(text)
        (root / "src" / "ok.hpp").write_text("#pragma once\n" + "\n" * 598 + "// line 600\n")
        (root / "src" / "big.cu").write_text("// line\n" * 601)
        (root / "src" / "notes.txt").write_text("x\n" * 1000)  # not a source file
        sizes = {name: length for name, _, length in functions(ctags, root / "src" / "sub" / "long.cpp")}
        expect(sizes == {"sixty_one": 61, "sixty": 60}, f"ctags measured {sizes}")
        offenders, _ = check(root, {}, ctags)
        expect(len(offenders) == 2, f"expected 2 offenders, got {offenders}")
        expect(any("src/sub/long.cpp:1: sixty_one: 61 lines" in o for o in offenders), f"61-line function: {offenders}")
        expect(any(o.startswith("src/big.cu: 601 lines") for o in offenders), f"601-line file: {offenders}")
        allowed = {"src/sub/long.cpp:sixty_one": 61, "src/big.cu": 601, "src/gone.cpp": 700}
        offenders, notes = check(root, allowed, ctags)
        expect(offenders == [], f"allow-listed offenders still reported: {offenders}")
        expect(notes == ["allow-list entry src/gone.cpp is no longer needed (within the limit or gone)"],
               f"notes: {notes}")
        offenders, _ = check(root, {"src/sub/long.cpp:sixty_one": 60}, ctags)
        expect(any("over its allow-list entry of 60" in o for o in offenders), f"cap exceeded: {offenders}")
    print("check_sizes self-test: a 61-line function and a 601-line file are caught; allow-list entries work")
    return 0


def expect(ok, message):
    if not ok:
        raise SystemExit(f"check_sizes self-test FAILED: {message}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[2])
    parser.add_argument("--allowlist", type=pathlib.Path)
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    ctags = find_ctags()
    if ctags is None:
        print("check_sizes: universal-ctags not found (Debian: universal-ctags; ./dev installs it); skipped")
        return SKIP
    if args.self_test:
        return self_test(ctags)
    allowed = read_allowlist(args.allowlist)
    offenders, notes = check(args.root.resolve(), allowed, ctags)
    for note in notes:
        print(f"note: {note}")
    if offenders:
        print(f"{len(offenders)} over the size limits (functions <= {FUNCTION_LIMIT} lines, files <= {FILE_LIMIT}):")
        for line in offenders:
            print(f"  {line}")
        print("Split them into named helpers; an allow-list entry is for work in progress only.")
        return 1
    print(f"check_sizes: every function in {args.root}/src within {FUNCTION_LIMIT} lines, every file within "
          f"{FILE_LIMIT} ({len(allowed)} allow-list entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

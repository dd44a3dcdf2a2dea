#!/usr/bin/env python3
"""Unpacks .deb files into a prefix without dpkg: usage unpack_debs.py DEB_DIR PREFIX.

A .deb is an ar archive holding data.tar.*; we extract that. Libraries that Debian puts under
/lib/x86_64-linux-gnu are moved next to the ones under /usr/lib/x86_64-linux-gnu so one rpath finds
all of them."""
import io
import os
import shutil
import sys
import tarfile


def members(path):
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SystemExit(f"{path}: not an ar archive")
        while True:
            header = f.read(60)
            if len(header) < 60:
                return
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            data = f.read(size)
            f.read(size % 2)
            yield name, data


def main():
    debs, prefix = sys.argv[1], os.path.abspath(sys.argv[2])
    for name in sorted(os.listdir(debs)):
        if not name.endswith(".deb"):
            continue
        for member, data in members(os.path.join(debs, name)):
            if member.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
                    t.extractall(prefix, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    lib = os.path.join(prefix, "usr", "lib", "x86_64-linux-gnu")
    os.makedirs(lib, exist_ok=True)
    legacy = os.path.join(prefix, "lib", "x86_64-linux-gnu")
    if os.path.isdir(legacy):
        for f in os.listdir(legacy):
            if not os.path.lexists(os.path.join(lib, f)):
                shutil.move(os.path.join(legacy, f), lib)


if __name__ == "__main__":
    main()

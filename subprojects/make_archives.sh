#!/bin/sh
# Makes the archives in packagefiles/ from Debian's packages (run where apt works; the archives are
# committed, so builds never download anything). Source packages where their original tarball is
# small; for header-only libraries whose original tarball is large (nlohmann-json3: 8 MB, doctest:
# 2 MB), the headers of the Debian -dev package, repacked. Each wrap file names its archive and
# SHA-256; rerunning this gives the same bytes for the repacked ones (sorted, mtime 0, owner root).
# usage: subprojects/make_archives.sh   (needs deb-src lines for bookworm and trixie: gloo's
# bookworm original tarball is not on the mirror, trixie's 2023-12-02 snapshot is)
set -eu
cd "$(dirname "$0")/packagefiles"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && apt-get source --download-only fmtlib=9.1.0+ds1-2 cli11=2.1.2+ds-1 \
  gloo=0.0~git20231202.5354032-3 >/dev/null)
cp "$work"/fmtlib_9.1.0+ds1.orig.tar.gz "$work"/cli11_2.1.2+ds.orig.tar.xz \
  "$work"/gloo_0.0~git20231202.5354032.orig.tar.xz .

repack() {  # repack DEB DIR: the deb's /usr/include as DIR/include, as DIR.tar.xz
  (cd "$work" && apt-get download "$1" >/dev/null && dpkg-deb -x "$1"_*.deb "x-$1")
  mkdir -p "$work/$2"
  cp -r "$work/x-$1/usr/include" "$work/$2/include"
  tar -C "$work" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - "$2" | xz -9 >"$2.tar.xz"
}
repack nlohmann-json3-dev nlohmann_json-3.11.2
repack doctest-dev doctest-2.4.9
sha256sum ./*

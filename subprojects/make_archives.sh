#!/bin/sh
# Makes the archives in packagefiles/ from Debian's packages (run where apt works; the archives are
# committed, so builds never download anything). Source packages where their original tarball is
# small; for header-only libraries whose original tarball is large (nlohmann-json3: 8 MB, doctest:
# 2 MB, Boost: 120 MB), the headers of the Debian -dev package, repacked (Boost: only the headers
# eplb can reach). Each wrap file names its archive and SHA-256; rerunning this gives the same bytes
# for the repacked ones (sorted, mtime 0, owner root, fixed modes).
# usage: subprojects/make_archives.sh   (needs deb-src lines for bookworm and trixie: gloo's
# bookworm original tarball is not on the mirror, trixie's 2023-12-02 snapshot is)
set -eu
cd "$(dirname "$0")/packagefiles"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && apt-get source --download-only fmtlib=9.1.0+ds1-2 cli11=2.1.2+ds-1 \
  gloo=0.0~git20231202.5354032-3 benchmark=1.7.1-1 >/dev/null)
cp "$work"/fmtlib_9.1.0+ds1.orig.tar.gz "$work"/cli11_2.1.2+ds.orig.tar.xz \
  "$work"/gloo_0.0~git20231202.5354032.orig.tar.xz "$work"/benchmark_1.7.1.orig.tar.gz .

unpack() {  # unpack DEB[=VERSION]: the binary package's files in $work/x-DEB
  (cd "$work" && apt-get download "$1" >/dev/null && dpkg-deb -x "${1%%=*}"_*.deb "x-${1%%=*}")
}
pack() {  # pack DIR: $work/DIR as DIR.tar.xz, the same bytes for the same files
  tar -C "$work" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=u=rwX,go=rX \
    -cf - "$1" | xz -9 >"$1.tar.xz"
}
repack() {  # repack DEB DIR: the deb's /usr/include as DIR/include, as DIR.tar.xz
  unpack "$1"
  mkdir -p "$work/$2"
  cp -r "$work/x-$1/usr/include" "$work/$2/include"
  pack "$2"
}
repack nlohmann-json3-dev nlohmann_json-3.11.2
repack doctest-dev doctest-2.4.9

# Boost 1.81 for systems whose Boost is older (Ubuntu 22.04: 1.74). Of libboost1.81-dev's headers,
# those reachable from Boost.Asio, Boost.System and Boost.Config (whole trees: what eplb includes,
# and what other compilers and options select inside them), following every header name in every
# file reached, in #if branches or not, so that no configuration misses one (the system's headers
# would fill the gap silently). MPL makes its preprocessed headers' names from macros: GCC's set
# (GCC and Clang) is named here. The licence comes from Debian's copyright file.
unpack libboost1.81-dev=1.81.0-5+deb12u1
inc=$work/x-libboost1.81-dev/usr/include
boost=boost_headers-1.81.0
python3 - "$inc" boost/asio.hpp boost/asio boost/system boost/config boost/mpl/aux_/preprocessed/gcc \
  >"$work/boost.list" <<'EOF'
import os, re, sys
# The include closure: `unread` holds the headers found but not yet scanned for #include lines.
root, unread = sys.argv[1], []
for seed in sys.argv[2:]:
    tree = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, seed)) for f in fs]
    unread += [os.path.relpath(p, root) for p in tree] or [seed]
name = re.compile(r'[<"](boost/[\w./-]+\.(?:hpp|h|ipp))[>"]')
seen = set()
while unread:
    f = os.path.normpath(unread.pop())
    if f not in seen and os.path.isfile(os.path.join(root, f)):
        seen.add(f)
        unread += name.findall(open(os.path.join(root, f), encoding='latin-1').read())
print('\n'.join(sorted(seen)))
EOF
mkdir -p "$work/$boost/include"
(cd "$inc" && xargs cp --parents -t "$work/$boost/include" <"$work/boost.list")
# The paragraph that starts with 'License: BSL-1.0' (the licence's text), unfolded: ' .' is an
# empty line.
awk 'p == "" && $0 == "License: BSL-1.0" { on = 1; next } on && $0 == "" { exit }
     on { sub(/^ /, ""); print ($0 == "." ? "" : $0) } { p = $0 }' \
  "$work/x-libboost1.81-dev/usr/share/doc/libboost1.81-dev/copyright" >"$work/$boost/LICENSE_1_0.txt"
pack "$boost"
sha256sum ./*.tar.*

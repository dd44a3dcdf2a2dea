#!/usr/bin/env bash
# Issue 18, item 6: eplb as engines consume it. Installs BUILD_DIR into a scratch prefix (DESTDIR),
# then builds and runs examples/embed/serving_loop.cpp three ways:
#   pkg-config (g++ -std=c++20 with eplb.pc's flags: none forces a standard or names an absolute path),
#   CMake (find_package(eplb), the imported target eplb::eplb),
#   Meson with eplb as a subproject (and checks that no eplb test or install rule enters that build).
# usage: tests/consumers/run.sh BUILD_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
build=$(realpath "$1")
root=$PWD
scratch=$(mktemp -d /tmp/consumers.XXXXXX)  # no "eplb" in it: the install check greps for it
trap 'rm -rf "$scratch"' EXIT
example=$root/examples/embed/serving_loop.cpp

meson install -C "$build" --destdir "$scratch/stage" --quiet --no-rebuild
prefix=$(meson introspect "$build" --buildoptions | python3 -c \
  'import json, sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "prefix"))')
libdir=$(meson introspect "$build" --buildoptions | python3 -c \
  'import json, sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "libdir"))')
stage=$scratch/stage$prefix
export LD_LIBRARY_PATH=$stage/$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

echo "== pkg-config consumer"
# (--define-variable, not --define-prefix: that one assumes PREFIX/lib/pkgconfig, not multiarch.)
flags=$(PKG_CONFIG_PATH=$stage/$libdir/pkgconfig pkg-config --define-variable=prefix="$stage" --cflags --libs eplb)
echo "pkg-config --cflags --libs eplb: $flags"
g++ -std=c++20 -o "$scratch/pc_serving_loop" "$example" $flags
"$scratch/pc_serving_loop"

echo "== CMake consumer (find_package)"
mkdir -p "$scratch/cmake"
cp tests/consumers/cmake/CMakeLists.txt "$example" "$scratch/cmake/"
cmake -S "$scratch/cmake" -B "$scratch/cmake/build" -G Ninja -DCMAKE_PREFIX_PATH="$stage" >/dev/null
cmake --build "$scratch/cmake/build" >/dev/null
grep -q -- '-std=gnu++20\|-std=c++20' "$scratch/cmake/build/build.ninja" ||
  { echo "eplb::eplb did not ask for C++20" >&2; exit 1; }
"$scratch/cmake/build/serving_loop"

echo "== Meson consumer (eplb as a subproject)"
mkdir -p "$scratch/meson/subprojects"
cp tests/consumers/meson/meson.build "$example" "$scratch/meson/"
# The clean tree only (git ls-files): build directories of this checkout stay out.
mkdir "$scratch/meson/subprojects/eplb"
git ls-files -z | xargs -0 cp --parents -t "$scratch/meson/subprojects/eplb"
meson setup "$scratch/meson/build" "$scratch/meson" >"$scratch/meson-setup.log" ||
  { tail -30 "$scratch/meson-setup.log"; exit 1; }
meson compile -C "$scratch/meson/build" >/dev/null
tests=$(meson test -C "$scratch/meson/build" --no-rebuild --list)
[ "$tests" = "serving_loop" ] || { echo "the consumer's build has eplb's tests: $tests" >&2; exit 1; }
installed=$(meson introspect "$scratch/meson/build" --installed)
if grep -q eplb <<<"$installed"; then
  echo "the consumer's build installs eplb's files: $installed" >&2
  exit 1
fi
meson test -C "$scratch/meson/build" --print-errorlogs
echo "consumers OK: pkg-config, CMake find_package(eplb), Meson subproject"

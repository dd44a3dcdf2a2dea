#!/bin/sh
# Downloads the Debian packages a GPU machine lacks (it has no apt and no network) into deps/debs,
# a git-ignored folder the device call carries. Run here, where apt works. Only for
# `EPLB_DEPS=debs bench/gpu/run.sh`: by default the GPU build takes these from subprojects/.
set -eu
cd "$(dirname "$0")/../.."
mkdir -p deps/debs
cd deps/debs
apt-get download libgloo-dev libgloo0 libhiredis0.14 libibverbs1 libnl-3-200 libnl-route-3-200 \
  nlohmann-json3-dev libcli11-dev >/dev/null
ls -l

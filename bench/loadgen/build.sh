#!/bin/sh
# Builds the C++ load generator into bench/loadgen/build/openloop. It needs gRPC C++ (Debian's
# libgrpc++-dev) and pkg-config; without them, say how to get them and fail, so that
# bench/overload.py can fall back to its Python generator.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/build/openloop"
if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists grpc++ grpc; then
    echo "build.sh: gRPC C++ not found; install it with: apt-get install libgrpc++-dev pkg-config" >&2
    exit 1
fi
if [ -x "$out" ] && [ "$out" -nt "$here/openloop.cc" ]; then
    echo "$out"  # up to date
    exit 0
fi
mkdir -p "$here/build"
# shellcheck disable=SC2046  # pkg-config's flags are meant to split into words
g++ -O2 -std=c++17 -Wall -Wextra -pthread "$here/openloop.cc" \
    $(pkg-config --cflags --libs grpc++ grpc) -o "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"

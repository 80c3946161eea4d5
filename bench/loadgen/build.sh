#!/bin/sh
# Builds the C++ load generators into bench/loadgen/build/: openloop (unary calls) and openstream
# (bidirectional streams). They need gRPC C++ (Debian's libgrpc++-dev) and pkg-config; without
# them, say how to get them and fail, so that bench/overload.py can fall back to its Python
# generator. Prints the programs' paths.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists grpc++ grpc; then
    echo "build.sh: gRPC C++ not found; install it with: apt-get install libgrpc++-dev pkg-config" >&2
    exit 1
fi
mkdir -p "$here/build"
for name in openloop openstream; do
    out="$here/build/$name"
    if [ -x "$out" ] && [ "$out" -nt "$here/$name.cc" ] && [ "$out" -nt "$here/report.h" ] && [ "$out" -nt "$here/client.h" ]; then
        echo "$out"  # up to date
        continue
    fi
    # shellcheck disable=SC2046  # pkg-config's flags are meant to split into words
    g++ -O2 -std=c++17 -Wall -Wextra -pthread "$here/$name.cc" \
        $(pkg-config --cflags --libs grpc++ grpc) -o "$out.tmp"
    mv "$out.tmp" "$out"
    echo "$out"
done

#!/bin/sh
# Install Ferry into a virtual environment, with every package pinned: the one install step of
# the container image (deploy/Dockerfile runs it) and of tests/deploy/test_install.py, which
# runs it into a fresh venv and starts the server from it, so the recipe is tested, not text.
#
#   deploy/install.sh VENV serve|convert [SOURCE]
#
#   VENV     the virtual environment; created with $PYTHON (default python3) when missing
#   serve    the slim serving install: the server, onnxruntime (CPU), grpc; never torch
#   convert  serve + torch (CPU) and the conversion packages: the control plane
#   SOURCE   the Ferry source tree to install (default: the checkout this script is in)
#
# Pins: deploy/requirements/<serve|convert>.txt are applied as pip constraints, so every package
# pip installs, direct or transitive, gets exactly the version listed (the test checks that
# nothing outside them was installed). pip's own environment variables apply: for an offline
# build, PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse.
#
# torch: TORCH_INDEX_URL, when set, is the index torch comes from. Where the default index
# serves the CUDA build of torch for Linux (the public one does: several GiB of CUDA wheels),
# set it to PyTorch's CPU wheel index; torch is installed first, alone, so that nothing else
# can pull another build in.
set -eu

usage() {
    echo "usage: $0 VENV serve|convert [SOURCE]" >&2
    exit 2
}

[ $# -ge 2 ] && [ $# -le 3 ] || usage
venv=$1
target=$2
here=$(cd "$(dirname "$0")" && pwd)
source=${3:-$(dirname "$here")}

case $target in
serve) extra=server ;;
convert) extra=convert ;;
*) usage ;;
esac
pins=$here/requirements/$target.txt
[ -f "$pins" ] || { echo "$0: missing pins file $pins" >&2; exit 2; }
[ -f "$source/pyproject.toml" ] || { echo "$0: $source is not a Ferry source tree" >&2; exit 2; }

if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
py=$venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$target" = convert ]; then
    torch_pin=$(grep -E '^torch==' "$pins")
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$py" -m pip install --no-deps --index-url "$TORCH_INDEX_URL" "$torch_pin"
    else
        "$py" -m pip install --no-deps "$torch_pin"
    fi
fi
# A regular (not editable) install: the image holds a built wheel, never a path to sources.
"$py" -m pip install --constraint "$pins" "$source[$extra]"

# Check what the recipe promises before the image is tagged.
"$py" - "$target" <<'EOF'
import importlib.util
import sys

target = sys.argv[1]
import ferry.server.grpc.app  # noqa: F401  (the server imports: onnxruntime, grpc, health)
import ferry.server.probe  # noqa: F401  (the container's health probe)

has_torch = importlib.util.find_spec("torch") is not None
if target == "serve" and has_torch:
    sys.exit("install.sh: the slim serving install must not contain torch")
if target == "convert":
    if not has_torch:
        sys.exit("install.sh: the convert install lacks torch")
    import torch

    if torch.version.cuda is not None:
        sys.exit(f"install.sh: torch {torch.__version__} is a CUDA build; set TORCH_INDEX_URL")
print(f"install.sh: {target} install checked")
EOF

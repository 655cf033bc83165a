#!/usr/bin/env bash
# Installs libtorch for murmur and prints its directory (the value for LIBTORCH)
# on stdout; everything else goes to stderr.
#
# libtorch comes from the PyPI torch wheel, installed with pip --target into a
# cache directory, without Python ever importing it. The CPU variant skips the
# wheel's CUDA dependencies (about 1.2 GB instead of several GB); only the two
# small CUDA runtime packages that libtorch_cuda.so's loader path names are
# added. The result is cached: a second run downloads nothing.
#
# Environment:
#   LIBTORCH             use this libtorch instead (must contain lib/libtorch_cpu.so)
#   MURMUR_CACHE         cache directory (default: ~/.cache/murmur)
#   MURMUR_TORCH_VARIANT cpu (default) or cuda: the full wheel with its CUDA libraries
#   PYTHON               the Python whose pip installs the wheel (default: python3)
set -euo pipefail

TORCH_VERSION=2.13.0
CUDA_RUNTIME=13.0.96
CUDA_CUPTI=13.0.85

if [ -n "${LIBTORCH:-}" ]; then
  if [ ! -e "$LIBTORCH/lib/libtorch_cpu.so" ]; then
    echo "setup-libtorch: LIBTORCH=$LIBTORCH has no lib/libtorch_cpu.so; unset it to let murmur install libtorch" >&2
    exit 1
  fi
  echo "$LIBTORCH"
  exit 0
fi

variant="${MURMUR_TORCH_VARIANT:-cpu}"
case "$variant" in
  cpu) packages=(--no-deps "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDA_RUNTIME" "nvidia-cuda-cupti==$CUDA_CUPTI") ;;
  cuda) packages=("torch==$TORCH_VERSION") ;;
  *) echo "setup-libtorch: MURMUR_TORCH_VARIANT must be cpu or cuda (got '$variant')" >&2; exit 1 ;;
esac

cache="${MURMUR_CACHE:-$HOME/.cache/murmur}"
dest="$cache/libtorch-$TORCH_VERSION-$variant"
if [ -e "$dest/.complete" ]; then
  echo "$dest/torch"
  exit 0
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "setup-libtorch: $python not found; murmur needs Python 3 with pip to install libtorch" >&2; exit 1; }
mkdir -p "$cache"
partial="$dest.partial"
rm -rf "$partial"
echo "setup-libtorch: installing torch $TORCH_VERSION ($variant) into $dest (once; about 1.2 GB for cpu)" >&2
"$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
  --only-binary=:all: --target "$partial" "${packages[@]}" >&2
if [ ! -e "$partial/torch/lib/libtorch_cpu.so" ]; then
  echo "setup-libtorch: the wheel installed but $partial/torch/lib/libtorch_cpu.so is missing" >&2
  exit 1
fi
touch "$partial/.complete"
rm -rf "$dest"
mv "$partial" "$dest"
echo "$dest/torch"

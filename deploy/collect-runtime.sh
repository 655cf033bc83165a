#!/usr/bin/env bash
# Copies murmur's binaries and only the libtorch libraries they load into
# OUT/bin and OUT/lib (OUT/lib/torch/lib, OUT/lib/nvidia/...: the layout the
# libraries' own $ORIGIN paths expect), for the container image. The
# binaries find OUT/lib/torch/lib through their $ORIGIN/../lib/torch/lib
# runpath, so nothing needs LD_LIBRARY_PATH.
#
# Usage: LIBTORCH=DIR deploy/collect-runtime.sh OUT BINARY...
set -euo pipefail
out="$1"; shift
: "${LIBTORCH:?set LIBTORCH to the libtorch directory the binaries were built against}"
site="$(cd "$LIBTORCH/.." && pwd)"
mkdir -p "$out/bin" "$out/lib"
for bin in "$@"; do
  cp "$bin" "$out/bin/"
  # Debug info is most of a release binary's size; the image does without.
  if command -v strip >/dev/null; then strip --strip-debug "$out/bin/$(basename "$bin")"; fi
  # Every library the loader resolves inside the wheel's directory.
  ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
    real="$(realpath "$lib")"
    case "$real" in
      "$site"/*) rel="${real#"$site"/}"
                 mkdir -p "$out/lib/$(dirname "$rel")"
                 cp -n "$real" "$out/lib/$rel" ;;
    esac
  done
done
du -sh "$out" >&2

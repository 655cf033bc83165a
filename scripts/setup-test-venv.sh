#!/usr/bin/env bash
# Creates, once, the Python venv the end-to-end tests use as an independent
# gRPC client of murmur (grpcio, grpcio-reflection, grpcio-health-checking
# from PyPI: no code shared with murmur) and kubernetes-validate (the
# deploy test validates deploy/k8s offline), and prints its python's path.
# Cached in $MURMUR_CACHE/test-venv (default ~/.cache/murmur); a second run
# downloads nothing.
set -euo pipefail

cache="${MURMUR_CACHE:-$HOME/.cache/murmur}"
venv="$cache/test-venv"
# Pinned so that every run tests against the same client.
packages=("grpcio==1.85.1" "grpcio-reflection==1.85.1" "grpcio-health-checking==1.85.1" "protobuf==7.36.2"
  "kubernetes-validate==1.34.1")
stamp="$venv/.complete-$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-12)"

if [ ! -e "$stamp" ]; then
  echo "setup-test-venv: creating $venv (once)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: "${packages[@]}" >&2
  "$venv/bin/python" -c 'import grpc, grpc_reflection, grpc_health, kubernetes_validate' >&2
  touch "$stamp"
fi
echo "$venv/bin/python"

#!/usr/bin/env bash
# Sets up rootful podman for `make compose-test` and prints the podman-compose
# command to use on stdout; everything else goes to stderr.
#
# What it installs, once (a second run finds it all and downloads nothing):
#   - Debian's podman, runc and debootstrap (apt-get; needs root);
#   - podman-compose 1.6 from PyPI, in a venv under the cache (Debian's is too old);
#   - a base image, murmur-base:bookworm, made with debootstrap --variant=minbase
#     from the mirror apt is configured with (the tarball is cached), because
#     no registry (Docker Hub) is reachable from every machine;
#   - containers.conf for this machine's cgroup layout: runc (crun fails here),
#     cgroupfs, and ulimits at or below the host's hard limits.
#
# Environment: MURMUR_CACHE (default ~/.cache/murmur).
set -euo pipefail

cache="${MURMUR_CACHE:-$HOME/.cache/murmur}"
mkdir -p "$cache/podman"
say() { echo "setup-podman: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "needs root (rootful podman, apt-get, debootstrap); run as root"
  exit 1
fi

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} with apt-get (once)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >&2
fi

conf="$cache/podman/containers.conf"
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=32768
# Seen here: runc's setrlimit refused nproc 65536 and the shell's hard limit
# (96362) with EPERM, and took 32768; nofile at the hard limit works.
[ "$nproc" -gt 32768 ] && nproc=32768
cat > "$conf.new" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
mv "$conf.new" "$conf"
export CONTAINERS_CONF="$conf"

venv="$cache/podman/compose-venv"
if [ ! -x "$venv/bin/podman-compose" ]; then
  say "installing podman-compose 1.6 into $venv (once)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "podman-compose==1.6.*" >&2
fi

if ! podman image exists murmur-base:bookworm; then
  tarball="$cache/podman/bookworm-minbase.tar"
  if [ ! -e "$tarball" ]; then
    # The first Debian mirror apt uses (deb822 URIs: or one-line deb entries).
    mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
      | grep -v '^\s*#' | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -1 | tr -d ' ' || true)
    mirror="${mirror:-http://deb.debian.org/debian}"
    root="$cache/podman/rootfs"
    say "making the base image with debootstrap from $mirror (once)"
    rm -rf "$root"
    debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    rm -rf "$root"
  fi
  podman import "$tarball" murmur-base:bookworm >&2
fi

echo "CONTAINERS_CONF=$conf $venv/bin/podman-compose"

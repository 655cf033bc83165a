#!/usr/bin/env bash
# Makes sure `murmur chaos --netns` can run here: root, and the ip, tc and nft
# commands (Debian's iproute2 and nftables, installed once with apt-get when
# one is missing; a second run finds them and installs nothing).
#
# Never fails: where netns cannot run (not root, apt-get unable) it says why
# on stderr, and the netns tests then skip with that reason printed.
set -uo pipefail
say() { echo "setup-netns: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "not root: the netns chaos tests will skip (they need network namespaces)"
  exit 0
fi
missing=()
for tool in ip tc nft; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing iproute2 and nftables with apt-get for ${missing[*]} (once)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables; } >&2; then
    say "apt-get failed: the netns chaos tests will skip"
  fi
fi
exit 0

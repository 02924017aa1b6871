#!/usr/bin/env bash
# Make sure the Debian packages named as arguments (redis-server, chromium, ...) are installed: apt-get when
# we are root, otherwise say exactly what to run.
set -euo pipefail
declare -A binary=([redis-server]=redis-server [chromium]=chromium [faketime]=faketime)
missing=()
for package in "$@"; do
  command -v "${binary[$package]:-$package}" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing: ${missing[*]}. Install with: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q "${missing[@]}" >/dev/null

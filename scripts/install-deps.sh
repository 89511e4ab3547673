#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian bookworm machine (as root).
# Idempotent: a second run only checks.
set -euo pipefail

KERNEL_VERSION=6.1.0-50-cloud-amd64
KERNEL_PKG_VERSION=6.1.176-1
apt_packages=(gcc g++ make binutils gdb qemu-system-x86 busybox-static cpio
  "linux-image-${KERNEL_VERSION}-unsigned=${KERNEL_PKG_VERSION}"
  "linux-headers-${KERNEL_VERSION}=${KERNEL_PKG_VERSION}")

missing=()
for p in "${apt_packages[@]}"; do
  name=${p%%=*}
  dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

rustup target list --installed | grep -qx x86_64-unknown-none || rustup target add x86_64-unknown-none
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

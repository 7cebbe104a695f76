#!/usr/bin/env bash
# Installs what building and testing pagecast needs on Debian, beyond the
# Rust toolchain: a C/C++ toolchain and binutils (the guest program test
# re-assembles it), libclang (RocksDB's bindings), and the network tools the
# namespace tests and the evaluation use (iproute2, nftables; ethtool if it
# can, which the evaluation uses to switch segmentation offloads off and
# otherwise does without), and what the QEMU tests boot: QEMU, a Debian
# kernel and a static busybox for the guests' initramfs (tried, never
# fatal: without them those tests say they skip). Idempotent: installs
# only what is missing.
set -euo pipefail

packages=(build-essential binutils pkg-config libclang-dev iproute2 nftables)
optional=(ethtool qemu-system-x86 linux-image-amd64 busybox-static)

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install the Rust toolchain first (https://rustup.rs)" >&2
    exit 1
fi

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for p in "${packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
else
    echo "note: not a Debian system; make sure these are installed: ${packages[*]}" >&2
fi

if ((${#missing[@]})); then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            echo "error: need root (or sudo) to install: ${missing[*]}" >&2
            exit 1
        fi
    fi
    echo "installing: ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    updated=1
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Optional tools: tried, never fatal.
for p in "${optional[@]}"; do
    if command -v dpkg-query >/dev/null 2>&1 &&
        ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        if [ "$(id -u)" -eq 0 ] && [ "${updated:-0}" -eq 0 ]; then
            apt-get update -qq >/dev/null 2>&1 || true
            updated=1
        fi
        if [ "$(id -u)" -eq 0 ] &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null 2>&1; then
            echo "installed: $p" >&2
        else
            echo "note: $p is not installed (optional: without ethtool pagecast evaluate keeps offloads on; without QEMU, a kernel or busybox the QEMU tests skip)" >&2
        fi
    fi
done

#!/usr/bin/env bash
# Installs what building and testing pagecast needs on Debian, beyond the
# Rust toolchain:
#   - required: a C/C++ toolchain and binutils (the guest program test
#     re-assembles it), libclang (RocksDB's bindings), mold (links the test
#     binaries in seconds; .cargo/config.toml falls back to the system
#     linker without it), the network tools of the namespace tests and the
#     evaluation (iproute2, nftables), and cargo-nextest (the test runner;
#     from crates.io when the machine lacks it);
#   - what the QEMU tests boot: QEMU, a Debian kernel and a static busybox
#     for the guests' initramfs, ethtool (the evaluation switches
#     offloads off with it), and libvirt's daemon, QEMU driver and virsh
#     (the libvirt test runs two daemons as two hosts). Tried, and where one does not install its
#     tests skip, saying so, unless PAGECAST_REQUIRE is set (CI sets it):
#     then a package that does not install fails the set-up.
# Idempotent: installs only what is missing.
set -euo pipefail

packages=(build-essential binutils pkg-config libclang-dev mold iproute2 nftables)
optional=(ethtool qemu-system-x86 linux-image-amd64 busybox-static libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
strict=${PAGECAST_REQUIRE:+1}

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install the Rust toolchain first (https://rustup.rs)" >&2
    exit 1
fi

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

sudo=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
fi
updated=0
apt_install() {
    if [ "$(id -u)" -ne 0 ] && ((${#sudo[@]} == 0)); then
        echo "error: need root (or sudo) to install: $*" >&2
        return 1
    fi
    if ((updated == 0)); then
        "${sudo[@]}" apt-get update -qq
        updated=1
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for p in "${packages[@]}"; do
        installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "installing: ${missing[*]}" >&2
        apt_install "${missing[@]}"
    fi
    for p in "${optional[@]}"; do
        installed "$p" && continue
        if apt_install "$p" 2>/dev/null; then
            echo "installed: $p" >&2
        elif [ -n "$strict" ]; then
            echo "error: $p did not install, and PAGECAST_REQUIRE=$PAGECAST_REQUIRE needs every test to run" >&2
            exit 1
        else
            echo "note: $p is not installed: the tests that need it skip, saying so (without ethtool pagecast-evaluate keeps offloads on)" >&2
        fi
    done
    # libvirt's QEMU driver looks its QEMU user up when it starts; Debian's
    # libvirt-daemon-system (not installed: it starts system services)
    # would add it.
    if installed libvirt-daemon && ! getent passwd libvirt-qemu >/dev/null; then
        "${sudo[@]}" groupadd -r libvirt-qemu 2>/dev/null || true
        "${sudo[@]}" useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
        echo "added the user libvirt-qemu (libvirt's QEMU driver expects it)" >&2
    fi
else
    echo "note: not a Debian system; make sure these are installed: ${packages[*]} ${optional[*]}" >&2
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest (the test runner) from crates.io" >&2
    cargo install --locked cargo-nextest
fi

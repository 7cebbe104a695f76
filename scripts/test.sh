#!/usr/bin/env bash
# Runs every check and test of pagecast: formatting, clippy with warnings as
# errors, the whole workspace's tests (unit, integration, cross-crate, doc),
# one run of the QEMU benchmark and a build of the fuzz targets. Tests that
# need /dev/kvm or root say that they skip where those are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

step() { echo "== $*" >&2; }

if cargo fmt --version >/dev/null 2>&1; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
else
    echo "note: rustfmt is not installed; skipping the format check" >&2
fi

if cargo clippy --version >/dev/null 2>&1; then
    step "cargo clippy"
    cargo clippy --workspace --all-targets --locked -- -D warnings
else
    echo "note: clippy is not installed; skipping lints" >&2
fi

step "cargo test"
cargo test --workspace --locked

# One run of the QEMU benchmark (direct QEMU against pagecast), test
# profile: it prints its figures and ratios and fails only if a migration
# fails; it says it skips where QEMU, a kernel or busybox is missing.
step "QEMU benchmark, one run"
PAGECAST_BENCH_RUNS=1 cargo bench --locked --profile dev -p pagecast-benches --bench qemu

step "fuzz targets build"
cargo build --locked --manifest-path fuzz/Cargo.toml --bins

step "all checks passed"

#!/usr/bin/env bash
# Runs every check and test of pagecast, as CI does (.ci/run):
#   1. what this machine offers the tests (KVM, root, packet capture,
#      loopback multicast, namespaces, nftables, tc, QEMU with a kernel and
#      busybox, binutils, cgroup v2, tmpfs, KSM); under PAGECAST_REQUIRE
#      (CI: all) a missing one fails here, before anything is built, and
#      so does less than 6 GiB free for the target or temporary directory;
#   2. formatting and clippy with warnings as errors;
#   3. the build of every test binary;
#   4. every test under cargo nextest, two at a time, heavy ones taking
#      turns (.config/nextest.toml): unit, integration, cross-crate (the
#      e2e binary), the fuzz targets over their seed corpus, doc tests;
#   5. a build of the cargo-fuzz targets;
#   6. a summary: time per step and every test that skipped.
# Benchmarks are not run here: `cargo bench` (docs/benchmarks.md).
#
# Environment: PAGECAST_REQUIRE (all, or needs such as kvm,qemu: a test
# that cannot run its subject fails instead of skipping), NEXTEST_PROFILE.
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$SECONDS
last=$SECONDS
current=""
timings=()
# Starts step $1, recording how long the previous one took.
step() {
    if [ -n "$current" ]; then
        timings+=("$(printf '%5ds  %s' $((SECONDS - last)) "$current")")
    fi
    current=$1
    last=$SECONDS
    echo "== $1 (at $((SECONDS - t0)) s)" >&2
}

step "setup (scripts/setup.sh)"
./scripts/setup.sh

target=${CARGO_TARGET_DIR:-$PWD/target}
mkdir -p "$target"
export PAGECAST_SKIP_LOG=$target/test-skips.log
rm -f "$PAGECAST_SKIP_LOG"

step "what this machine offers the tests"
cargo run -q --locked -p pagecast-testkit

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build the tests"
cargo test --workspace --locked --no-run

step "cargo nextest run"
cargo nextest run --workspace --locked

step "doc tests"
cargo test --workspace --locked --doc

step "fuzz targets build"
cargo build --locked --manifest-path fuzz/Cargo.toml --bins

step "done"
echo "== where the time went" >&2
printf '%s\n' "${timings[@]}" >&2
printf '%5ds  total\n' $((SECONDS - t0)) >&2
cargo run -q --locked -p pagecast-testkit -- skips "$PAGECAST_SKIP_LOG" >&2
echo "== all checks passed" >&2

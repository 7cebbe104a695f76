#!/usr/bin/env bash
# pagecast's main job, as far as it goes today: make a small cluster's worth
# of synthetic guest memory images (three families, three VMs each), scan
# them (how much each VM holds, how much they share, how many bytes a gang
# transfer saves against per-VM pre-copy), then plan the evacuation of a
# rack of them with every strategy (docs/examples/rack.toml).
#
# Environment: PAGECAST_DEMO_DIR (default ./demo-out), PAGECAST_DEMO_MEMORY
# (per VM, default 128MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

out=${PAGECAST_DEMO_DIR:-demo-out}
memory=${PAGECAST_DEMO_MEMORY:-128MiB}

echo "== building pagecast (release)" >&2
cargo build --release --locked -p pagecast-agent --bin pagecast
pagecast=./target/release/pagecast

echo "== writing synthetic guest images into $out/images" >&2
"$pagecast" synth --out "$out/images" --family web --family db --family cache \
    --vms 3 --memory "$memory" --force

echo "== scanning them" >&2
"$pagecast" scan "$out"/images/*.raw

echo "== planning the evacuation of rack A (docs/examples/rack.toml)" >&2
cp docs/examples/rack.toml "$out/rack.toml"
"$pagecast" plan --topology "$out/rack.toml" --advise

#!/usr/bin/env bash
# pagecast's main job, as far as it goes today: make a small cluster's worth
# of synthetic guest memory images (three families, three VMs each), scan
# them (how much each VM holds, how much they share, how many bytes a gang
# transfer saves against per-VM pre-copy), then plan the evacuation of a
# rack of them with every strategy (docs/examples/rack.toml), run a
# three-replica content index on loopback, publish the images to it as VMs
# of three hosts and ask it who holds what (docs/index.md), and, where
# /dev/kvm exists, start two host agents that publish their VMs to the
# index, live-migrate a running micro-VM from one to the other
# (docs/migration.md), and show the cluster as the index sees it.
#
# Environment: PAGECAST_DEMO_DIR (default ./demo-out), PAGECAST_DEMO_MEMORY
# (per VM, default 128MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

out=${PAGECAST_DEMO_DIR:-demo-out}
memory=${PAGECAST_DEMO_MEMORY:-128MiB}

echo "== building pagecast (release)" >&2
cargo build --release --locked -p pagecast-cli --bin pagecast
pagecast=./target/release/pagecast

echo "== writing synthetic guest images into $out/images" >&2
"$pagecast" synth --out "$out/images" --family web --family db --family cache \
    --vms 3 --memory "$memory" --force

echo "== scanning them" >&2
"$pagecast" scan "$out"/images/*.raw

echo "== planning the evacuation of rack A (docs/examples/rack.toml)" >&2
cp docs/examples/rack.toml "$out/rack.toml"
"$pagecast" plan --topology "$out/rack.toml" --advise

echo "== starting a three-replica content index on loopback (logs in $out/index-*.log)" >&2
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
base=$((20000 + RANDOM % 20000))
ports=($base $((base + 1)) $((base + 2)))
peers="1=127.0.0.1:${ports[0]},2=127.0.0.1:${ports[1]},3=127.0.0.1:${ports[2]}"
rm -rf "$out/index"
for id in 1 2 3; do
    "$pagecast" index serve --id "$id" --listen "127.0.0.1:${ports[$((id - 1))]}" --peers "$peers" \
        --data "$out/index/r$id" --shards 4 2>"$out/index-$id.log" &
    pids+=($!)
done
export PAGECAST_INDEX="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
for _ in $(seq 50); do
    "$pagecast" index status >/dev/null 2>&1 && break
    sleep 0.2
done
i=0
for img in "$out"/images/*.raw; do
    name=$(basename "$img" .raw)
    host=host-$((i % 3 + 1))
    i=$((i + 1))
    [ "$name" = web-2 ] && continue # kept out: the image we ask about below
    "$pagecast" index load --host "$host" --vm "$name=$img" --no-progress
done
"$pagecast" index status
echo "== who already holds web-2's pages, and where should it go?" >&2
"$pagecast" index holders --image "$out/images/web-2.raw" --no-progress
"$pagecast" advise --vm web-0 --top 3

if [ ! -e /dev/kvm ]; then
    echo "== skipping the live migration: /dev/kvm is not available here" >&2
    exit 0
fi

echo "== starting two host agents on loopback" >&2
secret="$out/cluster.secret"
[ -f "$secret" ] || "$pagecast" secret new "$secret"
export PAGECAST_SECRET_FILE="$secret"
start_agent() { # name rack -> sets $addr (in this shell, so the trap knows its pid)
    local fifo="$out/$1.addr"
    rm -f "$fifo"
    mkfifo "$fifo"
    # PAGECAST_INDEX is set: the agent publishes its VMs to the index.
    "$pagecast" agent --name "$1" --listen 127.0.0.1:0 --rack "$2" --link 10G \
        --capacity 2GiB >"$fifo" 2>"$out/$1.log" &
    pids+=($!)
    local line
    read -r line <"$fifo"
    rm -f "$fifo"
    addr="${line#listening on }"
}
start_agent host-a rack-a
a=$addr
start_agent host-b rack-b
b=$addr
echo "   host-a on $a, host-b on $b (logs in $out/host-*.log)" >&2

echo "== starting web1 on host-a (writing 5000 pages/s) and web2, of the same family, on host-b" >&2
"$pagecast" vm start --agent "$a" --name web1 --synthetic web --memory 256MiB --dirty-rate 5000
"$pagecast" vm start --agent "$b" --name web2 --synthetic web:index=1 --memory 256MiB
sleep 1

echo "== migrating web1 to host-b at 1 Gbit/s" >&2
"$pagecast" migrate --vm web1 --from "$a" --to "$b" --bandwidth 1G
sleep 1
"$pagecast" vm list --agent "$b"

echo "== the cluster as the index sees it (the agents keep it current)" >&2
sleep 2
"$pagecast" hosts
echo "== advice for the live cluster" >&2
"$pagecast" advise --vm web1 --top 3
"$pagecast" advise --cluster
"$pagecast" advise --image "$out/images/web-2.raw" --no-progress

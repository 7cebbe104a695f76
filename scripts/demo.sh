#!/usr/bin/env bash
# pagecast's main job on a local cluster: a three-replica content index and
# host agents in two racks on loopback, running KVM micro-VMs of three
# synthetic families (VMs of one family share content, as clones of one
# template do). It shows the cluster as the index sees it, asks for
# placement advice, plans the evacuation of rack A, evacuates it (every
# unique page sent once, multicast, each VM verified) with a report while
# a host of rack B is cordoned, and clones one VM to three hosts, each
# clone with an identity of its own. One VM (web2) runs in a dedup domain of
# its own, tenant-b: its memory is the web template's, yet it shares
# nothing with the other VMs, and the plan's savings show the cost.
# Everything it starts is stopped when it ends, Ctrl-C included.
#
# Environment: PAGECAST_DEMO_DIR (default ./demo-out), PAGECAST_DEMO_MEMORY
# (per VM, default 96MiB), PAGECAST_DEMO_TENANT (web2's dedup domain,
# default tenant-b; "cluster" puts it with the others), PAGECAST_DEMO_PROFILE
# (cargo profile to build, default release).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

out=${PAGECAST_DEMO_DIR:-demo-out}
memory=${PAGECAST_DEMO_MEMORY:-96MiB}

tenant=${PAGECAST_DEMO_TENANT:-tenant-b}
profile=${PAGECAST_DEMO_PROFILE:-release}
echo "== building pagecast ($profile)" >&2
cargo build --profile "$profile" --locked -p pagecast-cli --bin pagecast
case "$profile" in dev) dir=debug ;; *) dir=$profile ;; esac
pagecast=${CARGO_TARGET_DIR:-$PWD/target}/$dir/pagecast

if [ ! -e /dev/kvm ]; then
    echo "== /dev/kvm is not available here: the agents cannot run micro-VMs; showing a plan from images instead" >&2
    "$pagecast" synth --out "$out/images" --family web --family db --vms 3 --memory 64MiB --force
    cp docs/examples/rack.toml "$out/rack.toml"
    "$pagecast" plan --topology "$out/rack.toml" --advise
    exit 0
fi

mkdir -p "$out"
index_pids=()
agent_pids=()
stop() {
    if (($#)); then
        kill "$@" 2>/dev/null || true
        wait "$@" 2>/dev/null || true
    fi
}
cleanup() {
    trap - EXIT INT TERM
    # Agents first: they withdraw their VMs from the index as they stop.
    stop "${agent_pids[@]}"
    stop "${index_pids[@]}"
}
trap cleanup EXIT
trap 'echo "== interrupted: stopping the cluster" >&2; exit 130' INT TERM

echo "== making the cluster's CA and a certificate per node (mutual TLS everywhere)" >&2
tls="$out/tls"
rm -rf "$tls"
"$pagecast" ca init --dir "$tls/ca" 2>>"$out/ca.log"
issue() { # name role
    "$pagecast" ca issue --dir "$tls/ca" --name "$1" --role "$2" --out "$tls/$1" 2>>"$out/ca.log"
}
for id in 1 2 3; do issue "index-$id" index; done
for h in a1 a2 b1 b2 b3; do issue "$h" host; done
issue operator operator
export PAGECAST_TLS="$tls/operator"

echo "== starting a three-replica content index on loopback (logs in $out/)" >&2
base=$((20000 + RANDOM % 20000))
ports=($base $((base + 1)) $((base + 2)))
peers="1=127.0.0.1:${ports[0]},2=127.0.0.1:${ports[1]},3=127.0.0.1:${ports[2]}"
rm -rf "$out/index"
for id in 1 2 3; do
    "$pagecast" index serve --id "$id" --listen "127.0.0.1:${ports[$((id - 1))]}" --peers "$peers" \
        --data "$out/index/r$id" --shards 4 --raft-log warning --tls "$tls/index-$id" \
        2>"$out/index-$id.log" &
    index_pids+=($!)
done
export PAGECAST_INDEX="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
for _ in $(seq 100); do
    "$pagecast" index status >/dev/null 2>&1 && break
    sleep 0.1
done

declare -A addr
start_agent() { # name rack
    local fifo="$out/$1.addr"
    rm -f "$fifo"
    mkfifo "$fifo"
    "$pagecast" agent --name "$1" --listen 127.0.0.1:0 --rack "$2" --link 10G \
        --capacity 1GiB --tls "$tls/$1" >"$fifo" 2>"$out/$1.log" &
    agent_pids+=($!)
    local line
    read -r line <"$fifo"
    rm -f "$fifo"
    addr[$1]="${line#listening on }"
}
echo "== starting host agents: rack-a (a1, a2) and rack-b (b1, b2, b3)" >&2
for h in a1 a2; do start_agent "$h" rack-a; done
for h in b1 b2 b3; do start_agent "$h" rack-b; done

vm() { # host name profile dirty-rate [domain]
    "$pagecast" vm start --agent "${addr[$1]}" --name "$2" --synthetic "$3" \
        --memory "$memory" --dirty-rate "$4" --working-set 2000 --domain "${5:-cluster}" >/dev/null
}
echo "== starting VMs: web and db on rack A (writing to memory), residents of the same families on rack B; web2 in dedup domain $tenant" >&2
vm a1 web1 web:index=1 1000
vm a1 db1 db:index=1 500
vm a2 web2 web:index=2 1000 "$tenant"
vm a2 cache1 cache:index=1 500
vm b1 web0 web:index=0 0
vm b2 db0 db:index=0 0
vm b3 cache0 cache:index=0 0
sleep 3

echo "== the cluster as the index sees it" >&2
"$pagecast" hosts
echo "== which VMs share memory, and where web1's content already is" >&2
"$pagecast" advise --cluster
"$pagecast" advise --vm web1 --top 3
echo "== web2 is a web VM too, but in dedup domain $tenant: pages are shared only within a domain" >&2
"$pagecast" advise --vm web2 --top 3
"$pagecast" vm list --agent "${addr[a2]}"

echo "== b3 is next for maintenance: cordoned, so no plan sends it VMs" >&2
"$pagecast" cordon b3
"$pagecast" hosts

echo "== the plan for evacuating rack A (nothing moves)" >&2
"$pagecast" evacuate --from a1,a2 --dry-run --no-progress

echo "== evacuating rack A" >&2
"$pagecast" evacuate --from a1,a2 --max-downtime 300

echo "== b3's maintenance is over: uncordoned" >&2
"$pagecast" uncordon b3

echo "== cloning web0 to three hosts, live: each clone gets an identity of its own" >&2
"$pagecast" clone --vm web0 --to b2,b3,a1 --max-downtime 300

echo "== the cluster afterwards" >&2
sleep 2
"$pagecast" hosts
echo "== done; stopping the cluster" >&2

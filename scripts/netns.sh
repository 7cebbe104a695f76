#!/usr/bin/env bash
# Builds (and tears down) a test network of N hosts as Linux network
# namespaces on one bridge, for pagecast's transport tests and benchmarks.
#
#   scripts/netns.sh up N [--mtu BYTES] [--rate RATE] [--loss PERCENT] [--prefix NAME]
#   scripts/netns.sh loss PERCENT [--prefix NAME]
#   scripts/netns.sh down [--prefix NAME]
#
# Host i is namespace NAME-h<i> with interface eth0 at 10.77.0.<i+1>/24 and
# a route for multicast (224.0.0.0/4) out of eth0. The bridge lives in its
# own namespace NAME-br with multicast snooping off, so nothing touches the
# root namespace. --rate shapes each host's egress with `tc tbf`; --loss
# drops that percentage of multicast datagrams arriving at hosts 1..N-1
# (the receivers) with an nftables `numgen random` rule: this kernel has
# no netem. Host 0 (the sender) drops nothing. Needs root, iproute2 and
# nftables. Run a command in host i with: ip netns exec NAME-h<i> CMD
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

cmd=${1:-}; shift || true
prefix=pcn mtu=1500 rate="" loss=0 n=0
if [ "$cmd" = up ]; then n=${1:-}; shift || true; fi
if [ "$cmd" = loss ]; then loss=${1:-}; shift || true; fi
while [ $# -gt 0 ]; do
    case $1 in
        --mtu) mtu=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --loss) loss=$2; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        *) usage ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then echo "error: $0 needs root" >&2; exit 1; fi
for t in ip nft tc; do
    command -v $t >/dev/null || { echo "error: $t is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
done

hosts() { ip netns list | awk '{print $1}' | grep -E "^${prefix}-h[0-9]+$" | sort -V || true; }

set_loss() {
    local ns=$1 pct=$2
    ip netns exec "$ns" nft delete table inet pagecast_loss 2>/dev/null || true
    if [ "$pct" != 0 ]; then
        ip netns exec "$ns" nft -f - <<NFT
table inet pagecast_loss {
    chain input {
        type filter hook input priority 0; policy accept;
        ip daddr 224.0.0.0/4 udp dport 1-65535 numgen random mod 100 < $pct drop
    }
}
NFT
    fi
}

case $cmd in
up)
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 2 ] && [ "$n" -le 200 ] || { echo "error: N must be 2..200" >&2; usage; }
    "$0" down --prefix "$prefix" >/dev/null 2>&1 || true
    br="${prefix}-br"
    ip netns add "$br"
    ip -n "$br" link add br0 type bridge mcast_snooping 0
    ip -n "$br" link set br0 mtu "$mtu" up
    for i in $(seq 0 $((n - 1))); do
        ns="${prefix}-h$i"
        ip netns add "$ns"
        ip link add "vh$i" netns "$br" type veth peer name eth0 netns "$ns"
        ip -n "$br" link set "vh$i" mtu "$mtu" master br0 up
        ip -n "$ns" link set eth0 mtu "$mtu" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0
        ip -n "$ns" route add 224.0.0.0/4 dev eth0
        if [ -n "$rate" ]; then
            burst=$(( mtu * 64 ))
            ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 20ms
        fi
        if [ "$i" -gt 0 ]; then set_loss "$ns" "$loss"; fi
    done
    echo "up: $n hosts ${prefix}-h0..h$((n - 1)) at 10.77.0.1..$n, mtu $mtu${rate:+, rate $rate}, loss ${loss}% at receivers"
    ;;
loss)
    for ns in $(hosts); do
        [ "$ns" = "${prefix}-h0" ] || set_loss "$ns" "$loss"
    done
    echo "loss ${loss}% at receivers"
    ;;
down)
    for ns in $(hosts) "${prefix}-br"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    ;;
*) usage ;;
esac

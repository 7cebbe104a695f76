#!/usr/bin/env bash
# Runs pagecast's strategies side by side on an emulated multi-rack network
# and writes a report measured from the interfaces' counters:
#
#   scripts/evaluate.sh TOPOLOGY.toml OUTDIR [--strategies precopy,vmscatter,pagecast] [--clone VM:N] [--quick] [--loss PCT]
#
# TOPOLOGY.toml is the file `pagecast plan` reads (docs/examples/eval.toml
# is the default two-rack one); OUTDIR gets report.json, report.md, the SVG
# plots and every process's log. Needs root and /dev/kvm; installs what it
# needs (scripts/setup.sh) and builds pagecast and its evaluation harness
# (release; set PAGECAST_EVAL_PROFILE=dev for the debug build). Every extra
# argument goes to `pagecast-evaluate` (see its --help). Ctrl-C stops
# everything and removes every namespace it made.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; fi
topology=$1 out=$2; shift 2
./scripts/setup.sh
profile=${PAGECAST_EVAL_PROFILE:-release}
echo "== building pagecast ($profile)" >&2
cargo build --profile "$profile" --locked -p pagecast-cli --bin pagecast -p pagecast-evaluate --bin pagecast-evaluate
case "$profile" in dev) dir=debug ;; *) dir=$profile ;; esac
exec "${CARGO_TARGET_DIR:-$PWD/target}/$dir/pagecast-evaluate" --topology "$topology" --out "$out" "$@"

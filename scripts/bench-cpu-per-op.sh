#!/usr/bin/env bash
# CPU per request, etcd against Regatta, on 127.0.0.1, run alternately:
# each round starts etcd afresh, then Regatta afresh (NODES members
# each, from scripts/lib/clusters.sh), warms each with
# 5,000 puts, and runs `regatta bench WORKLOAD` against every member.
# Prints req/s, p99, the servers' user+system CPU per request (summed over
# the members, from /proc/<pid>/stat around the run), the client's CPU
# time, and how idle the machine's cores were during the run (from
# /proc/stat): a run with idle cores is bound by latency, not by CPU.
#
#   [NODES=1|3] scripts/bench-cpu-per-op.sh [WORKLOAD] [TOTAL] [ROUNDS]
#   (defaults: put 60000 3; REGATTA_BIN picks the regatta binary;
#   WORKLOAD is put, range, mixed, mixed-90 or txn-put; CONNS sets the
#   client's connections, 8 by default, for 64 clients)
#
# With BASELINE_BIN set to another regatta binary, each round runs that
# build instead of etcd, then REGATTA_BIN: an A/B of two builds.
set -euo pipefail
cd "$(dirname "$0")/.."
workload="${1:-put}"
total="${2:-60000}"
rounds="${3:-3}"
nodes="${NODES:-1}"
conns="${CONNS:-8}"
regatta="${REGATTA_BIN:-$PWD/target/release/regatta}"
[ -x "$regatta" ] || cargo build --release -q -p regatta
baseline="${BASELINE_BIN:-}"
[ -n "$baseline" ] || command -v etcd >/dev/null || { echo "needs etcd (Debian: etcd-server)" >&2; exit 1; }
case "$nodes" in 1 | 3) ;; *) echo "NODES must be 1 or 3" >&2; exit 1 ;; esac
extra=()
if [ "$workload" = mixed-90 ]; then
    workload=mixed
    extra=(--read-percent 90)
fi
work="$(mktemp -d)"
pids=()
cleanup() { stop_all; rm -rf "$work"; }
trap cleanup EXIT
ticks="$(getconf CLK_TCK)"
servers_cpu() { # the members' user+system ticks
    local sum=0 pid
    for pid in "${pids[@]}"; do
        sum=$((sum + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$sum"
}
machine() { # "idle total" ticks over every core
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t }' /proc/stat
}

measure() { # name endpoints
    local name="$1" endpoints="$2" before after line client idle0 total0 idle1 total1
    "$regatta" bench put --endpoints "$endpoints" --total 5000 >/dev/null 2>&1
    # range and mixed fill the key space first: do it here, outside the
    # measurement, and skip it in the measured run.
    local fill=()
    if [ "$workload" != put ] && [ "$workload" != txn-put ]; then
        "$regatta" bench "$workload" --endpoints "$endpoints" --total 1 --key-space-size 10000 \
            --val-size 256 >/dev/null 2>&1
        fill=(--no-fill)
    fi
    before="$(servers_cpu)"
    read -r idle0 total0 < <(machine)
    line="$( { /usr/bin/time -f "client_cpu_s=%U+%S" "$regatta" bench "$workload" \
        --endpoints "$endpoints" --total "$total" --key-space-size 10000 --val-size 256 \
        --clients 64 --conns "$conns" "${fill[@]}" "${extra[@]}"; } 2>&1 | grep -E 'RESULT|client_cpu' | tr '\n' ' ')"
    read -r idle1 total1 < <(machine)
    after="$(servers_cpu)"
    client="$(echo "$line" | grep -o 'client_cpu_s=[0-9.+]*')"
    echo "$name nodes=$nodes $(echo "$line" | grep -o 'requests_per_second=[0-9]*') $(echo "$line" | grep -o 'p99_ms=[0-9.]*') server_cpu_us_per_request=$(( (after - before) * 1000000 / ticks / total )) $client idle_percent=$(( (idle1 - idle0) * 100 / (total1 - total0) ))"
}

# shellcheck source=lib/clusters.sh
source scripts/lib/clusters.sh

candidate="$regatta"
for _ in $(seq 1 "$rounds"); do
    if [ -n "$baseline" ]; then
        regatta="$baseline"
        start_regatta "$nodes"
        eps="$(endpoints 28440 "$nodes")"
        wait_ready "$eps"
        measure baseline "$eps"
        regatta="$candidate"
    else
        start_etcd "$nodes"
        eps="$(endpoints 23790 "$nodes")"
        wait_ready "$eps"
        measure etcd "$eps"
    fi
    stop_all
    start_regatta "$nodes"
    eps="$(endpoints 28440 "$nodes")"
    wait_ready "$eps"
    measure regatta "$eps"
    stop_all
done

#!/usr/bin/env bash
# CPU per request, etcd against Regatta, on 127.0.0.1, run alternately:
# each round starts etcd afresh, then Regatta afresh (NODES=1: one
# `regatta leader --dev`; NODES=3: three members each), warms each with
# 5,000 puts, and runs `regatta bench WORKLOAD` against every member.
# Prints req/s, p99, the servers' user+system CPU per request (summed over
# the members, from /proc/<pid>/stat around the run), the client's CPU
# time, and how idle the machine's cores were during the run (from
# /proc/stat): a run with idle cores is bound by latency, not by CPU.
#
#   [NODES=1|3] scripts/bench-cpu-per-op.sh [WORKLOAD] [TOTAL] [ROUNDS]
#   (defaults: put 60000 3; REGATTA_BIN picks the regatta binary;
#   WORKLOAD is put, range, mixed, mixed-90 or txn-put)
set -euo pipefail
cd "$(dirname "$0")/.."
workload="${1:-put}"
total="${2:-60000}"
rounds="${3:-3}"
nodes="${NODES:-1}"
regatta="${REGATTA_BIN:-$PWD/target/release/regatta}"
[ -x "$regatta" ] || cargo build --release -q -p regatta
command -v etcd >/dev/null || { echo "needs etcd (Debian: etcd-server)" >&2; exit 1; }
case "$nodes" in 1 | 3) ;; *) echo "NODES must be 1 or 3" >&2; exit 1 ;; esac
extra=()
if [ "$workload" = mixed-90 ]; then
    workload=mixed
    extra=(--read-percent 90)
fi
work="$(mktemp -d)"
pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
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
    before="$(servers_cpu)"
    read -r idle0 total0 < <(machine)
    line="$( { /usr/bin/time -f "client_cpu_s=%U+%S" "$regatta" bench "$workload" \
        --endpoints "$endpoints" --total "$total" --key-space-size 10000 --val-size 256 \
        "${extra[@]}"; } 2>&1 | grep -E 'RESULT|client_cpu' | tr '\n' ' ')"
    read -r idle1 total1 < <(machine)
    after="$(servers_cpu)"
    client="$(echo "$line" | grep -o 'client_cpu_s=[0-9.+]*')"
    echo "$name nodes=$nodes $(echo "$line" | grep -o 'requests_per_second=[0-9]*') $(echo "$line" | grep -o 'p99_ms=[0-9.]*') server_cpu_us_per_request=$(( (after - before) * 1000000 / ticks / total )) $client idle_percent=$(( (idle1 - idle0) * 100 / (total1 - total0) ))"
}

wait_up() { # endpoint
    for _ in $(seq 1 200); do
        "$regatta" bench put --endpoints "$1" --total 1 --clients 1 --conns 1 >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "not up: $1" >&2
    return 1
}

endpoints() { # base
    local list="" i
    for i in $(seq 1 "$nodes"); do list="${list:+$list,}127.0.0.1:$(($1 + i))"; done
    echo "$list"
}

start_etcd() {
    local cluster="" i
    for i in $(seq 1 "$nodes"); do
        cluster="${cluster:+$cluster,}e$i=http://127.0.0.1:$((23800 + i))"
    done
    for i in $(seq 1 "$nodes"); do
        rm -rf "$work/etcd$i"
        etcd --name "e$i" --data-dir "$work/etcd$i" \
            --listen-client-urls "http://127.0.0.1:$((23790 + i))" \
            --advertise-client-urls "http://127.0.0.1:$((23790 + i))" \
            --listen-peer-urls "http://127.0.0.1:$((23800 + i))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((23800 + i))" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --log-level error >"$work/etcd$i.log" 2>&1 &
        pids+=("$!")
    done
}

start_regatta() {
    local members="" i
    if [ "$nodes" = 1 ]; then
        rm -rf "$work/regatta1"
        "$regatta" leader --dev --data-dir "$work/regatta1" --api.address 127.0.0.1:28441 \
            --log-level warn >"$work/regatta1.log" 2>&1 &
        pids+=("$!")
        return
    fi
    for i in $(seq 1 "$nodes"); do
        members="${members:+$members,}$i=127.0.0.1:$((25010 + i))"
    done
    for i in $(seq 1 "$nodes"); do
        rm -rf "$work/regatta$i"
        "$regatta" leader --raft.node-id "$i" --raft.address "127.0.0.1:$((25010 + i))" \
            --raft.initial-members "$members" --api.address "127.0.0.1:$((28440 + i))" \
            --data-dir "$work/regatta$i" --log-level warn >"$work/regatta$i.log" 2>&1 &
        pids+=("$!")
    done
}

for _ in $(seq 1 "$rounds"); do
    start_etcd
    eps="$(endpoints 23790)"
    wait_up "${eps%%,*}"
    measure etcd "$eps"
    stop_all
    start_regatta
    eps="$(endpoints 28440)"
    wait_up "${eps%%,*}"
    measure regatta "$eps"
    stop_all
done

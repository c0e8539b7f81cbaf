#!/usr/bin/env bash
# Regatta against etcd on this machine: the same client (`regatta bench`,
# speaking etcd's v3 API), the same durability (fsync on for both), the same
# workloads, 1 node and 3 nodes on 127.0.0.1. Prints a side-by-side table.
#
#   scripts/bench-vs-etcd.sh [TOTAL]      (default 20000 requests per row)
#
# Environment: WORKLOADS (default "put range mixed mixed-90 txn-put") picks
# the rows; `mixed` is half reads, `mixed-90` 90% reads (the "mixed, 90%
# get" row of ../shared/ANCHORS.md);
# REGATTA_BIN runs that binary instead of building target/release/regatta
# (to compare two builds in one sitting).
#
# Needs the OS package etcd-server (installed here when missing, with apt).
set -euo pipefail
cd "$(dirname "$0")/.."
total="${1:-20000}"
clients=64
conns=8
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

if ! command -v etcd >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    echo "installing etcd-server" >&2
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
workloads="${WORKLOADS:-put range mixed mixed-90 txn-put}"
if [ -n "${REGATTA_BIN:-}" ]; then
    regatta="$REGATTA_BIN"
else
    echo "building regatta (release)" >&2
    cargo build --release -q -p regatta
    regatta="$PWD/target/release/regatta"
fi

stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}

start_etcd() { # nodes
    local nodes="$1" cluster="" i
    for i in $(seq 1 "$nodes"); do
        cluster="${cluster:+$cluster,}e$i=http://127.0.0.1:$((23800 + i))"
    done
    for i in $(seq 1 "$nodes"); do
        etcd --name "e$i" --data-dir "$work/etcd$nodes-$i" \
            --listen-client-urls "http://127.0.0.1:$((23790 + i))" \
            --advertise-client-urls "http://127.0.0.1:$((23790 + i))" \
            --listen-peer-urls "http://127.0.0.1:$((23800 + i))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((23800 + i))" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --log-level error >"$work/etcd$nodes-$i.log" 2>&1 &
        pids+=("$!")
    done
}

start_regatta() { # nodes
    local nodes="$1" members="" i
    for i in $(seq 1 "$nodes"); do
        members="${members:+$members,}$i=127.0.0.1:$((25010 + i))"
    done
    for i in $(seq 1 "$nodes"); do
        "$regatta" leader --raft.node-id "$i" --raft.address "127.0.0.1:$((25010 + i))" \
            --raft.initial-members "$members" --api.address "127.0.0.1:$((28440 + i))" \
            --data-dir "$work/regatta$nodes-$i" --log-level warn \
            >"$work/regatta$nodes-$i.log" 2>&1 &
        pids+=("$!")
    done
}

endpoints() { # base nodes
    local base="$1" nodes="$2" list="" i
    for i in $(seq 1 "$nodes"); do list="${list:+$list,}127.0.0.1:$((base + i))"; done
    echo "$list"
}

wait_ready() { # endpoints
    local first="${1%%,*}" i
    for i in $(seq 1 200); do
        if "$regatta" bench put --endpoints "$first" --total 1 --clients 1 --conns 1 \
            >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "not ready: $1" >&2
    return 1
}

run() { # endpoints workload extra...
    local endpoints="$1" workload="$2"
    shift 2
    if [ "$workload" = mixed-90 ]; then
        workload=mixed
        set -- --read-percent 90 "$@"
    fi
    "$regatta" bench "$workload" --endpoints "$endpoints" --clients "$clients" \
        --conns "$conns" --total "$total" --key-space-size 10000 --val-size 256 "$@" 2>/dev/null |
        sed -n 's/^RESULT //p'
}

field() { # line name
    echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"
}

rows=()
for nodes in 1 3; do
    for system in etcd regatta; do
        if [ "$system" = etcd ]; then
            start_etcd "$nodes"
            eps="$(endpoints 23790 "$nodes")"
        else
            start_regatta "$nodes"
            eps="$(endpoints 28440 "$nodes")"
        fi
        wait_ready "$eps"
        for workload in $workloads; do
            line="$(run "$eps" "$workload")"
            echo "$nodes node(s) $system $workload: $line" >&2
            rows+=("$nodes|$workload|$system|$(field "$line" requests_per_second)|$(field "$line" p50_ms)|$(field "$line" p99_ms)")
        done
        stop_all
    done
done

echo
echo "| nodes | workload | etcd req/s | etcd p50 | etcd p99 | regatta req/s | regatta p50 | regatta p99 | regatta / etcd |"
echo "|---|---|---|---|---|---|---|---|---|"
for nodes in 1 3; do
    for workload in $workloads; do
        e="" r=""
        for row in "${rows[@]}"; do
            IFS='|' read -r n w s rps p50 p99 <<<"$row"
            [ "$n" = "$nodes" ] && [ "$w" = "$workload" ] || continue
            if [ "$s" = etcd ]; then e="$rps|$p50|$p99"; else r="$rps|$p50|$p99"; fi
        done
        IFS='|' read -r er ep50 ep99 <<<"$e"
        IFS='|' read -r rr rp50 rp99 <<<"$r"
        ratio="$(awk -v a="$rr" -v b="$er" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
        echo "| $nodes | $workload | $er | $ep50 ms | $ep99 ms | $rr | $rp50 ms | $rp99 ms | ${ratio}× |"
    done
done
echo
echo "clients=$clients conns=$conns total=$total key-space=10000 val-size=256; $(nproc) CPUs; $(date -u +%F)"

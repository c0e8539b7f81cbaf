#!/usr/bin/env bash
# Regatta against etcd on this machine: the same client (`regatta bench`,
# speaking etcd's v3 API), the same durability (fsync on for both), the same
# workloads, 1 node and 3 nodes on 127.0.0.1. Prints a side-by-side table.
#
#   scripts/bench-vs-etcd.sh [TOTAL]      (default 20000 requests per row)
#
# Both clusters run side by side for each size, and each row alternates
# the two systems (etcd first in odd rounds, Regatta first in even ones),
# so a slow stretch of a shared machine hits both rather than one
# system's rows. The idle cluster costs a little CPU meanwhile (etcd's
# heartbeats; Regatta's quiesced groups next to none).
#
# Environment: WORKLOADS (default "put range mixed mixed-90 txn-put") picks
# the rows; `mixed` is half reads, `mixed-90` 90% reads (the "mixed, 90%
# get" row of ../shared/ANCHORS.md);
# SIZES (default "1 3") picks the cluster sizes;
# ROUNDS (default 1) runs every row that many times per system: the table
# shows medians, the ratio of the two medians, the median of the rounds'
# ratios (each round pairs the systems back to back, so it holds when the
# machine's speed drifts between rounds), and each round's ratio;
# REGATTA_BIN runs that binary instead of building target/release/regatta
# (to compare two builds in one sitting);
# CONNS (default 8) sets how many connections the 64 clients share
# (../shared/ANCHORS.md measured etcd with 4).
#
# Needs the OS package etcd-server (installed here when missing, with apt).
set -euo pipefail
cd "$(dirname "$0")/.."
total="${1:-20000}"
rounds="${ROUNDS:-1}"
clients=64
conns="${CONNS:-8}"
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
sizes="${SIZES:-1 3}"
for nodes in $sizes; do
    case "$nodes" in 1 | 3) ;; *) echo "SIZES takes 1 and 3 only, not $nodes" >&2; exit 1 ;; esac
done
if [ -n "${REGATTA_BIN:-}" ]; then
    regatta="$REGATTA_BIN"
else
    echo "building regatta (release)" >&2
    cargo build --release -q -p regatta
    regatta="$PWD/target/release/regatta"
fi

# shellcheck source=lib/clusters.sh
source scripts/lib/clusters.sh

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
for nodes in $sizes; do
    start_etcd "$nodes"
    start_regatta "$nodes"
    etcd_eps="$(endpoints 23790 "$nodes")"
    regatta_eps="$(endpoints 28440 "$nodes")"
    wait_ready "$etcd_eps"
    wait_ready "$regatta_eps"
    for workload in $workloads; do
        for round in $(seq 1 "$rounds"); do
            order="etcd regatta"
            [ $((round % 2)) -eq 0 ] && order="regatta etcd"
            for system in $order; do
                eps="$etcd_eps"
                [ "$system" = regatta ] && eps="$regatta_eps"
                line="$(run "$eps" "$workload")"
                echo "$nodes node(s) $system $workload round $round: $line" >&2
                rows+=("$nodes|$workload|$system|$round|$(field "$line" requests_per_second)|$(field "$line" p50_ms)|$(field "$line" p99_ms)")
            done
        done
    done
    stop_all
done

median() { # numbers...
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

echo
echo "| nodes | workload | etcd req/s | etcd p50 | etcd p99 | regatta req/s | regatta p50 | regatta p99 | regatta / etcd | median of round ratios | by round |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for nodes in $sizes; do
    for workload in $workloads; do
        ers=() ep50s=() ep99s=() rrs=() rp50s=() rp99s=() ratios=() by_round=""
        for round in $(seq 1 "$rounds"); do
            e="" r=""
            for row in "${rows[@]}"; do
                IFS='|' read -r n w s k rps p50 p99 <<<"$row"
                [ "$n" = "$nodes" ] && [ "$w" = "$workload" ] && [ "$k" = "$round" ] || continue
                if [ "$s" = etcd ]; then
                    e="$rps"
                    ers+=("$rps") ep50s+=("$p50") ep99s+=("$p99")
                else
                    r="$rps"
                    rrs+=("$rps") rp50s+=("$p50") rp99s+=("$p99")
                fi
            done
            one="$(awk -v a="$r" -v b="$e" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
            by_round="${by_round:+$by_round, }${one}×"
            [ "$one" = - ] || ratios+=("$one")
        done
        er="$(printf '%.0f' "$(median "${ers[@]}")")" rr="$(printf '%.0f' "$(median "${rrs[@]}")")"
        ratio="$(awk -v a="$rr" -v b="$er" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
        echo "| $nodes | $workload | $er | $(median "${ep50s[@]}") ms | $(median "${ep99s[@]}") ms | $rr | $(median "${rp50s[@]}") ms | $(median "${rp99s[@]}") ms | ${ratio}× | $(median "${ratios[@]}")× | $by_round |"
    done
done
echo
echo "clients=$clients conns=$conns total=$total rounds=$rounds key-space=10000 val-size=256; $(nproc) CPUs; $(date -u +%F)"

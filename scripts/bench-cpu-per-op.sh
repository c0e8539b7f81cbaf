#!/usr/bin/env bash
# CPU per request, etcd against Regatta, 1 node each on 127.0.0.1, run
# alternately: each round starts etcd afresh, then `regatta leader --dev`
# afresh, warms each with 5,000 puts, and runs `regatta bench WORKLOAD`
# against it. Prints req/s, p99, the server's user+system CPU per request
# (from /proc/<pid>/stat around the run) and the client's CPU time.
#
#   scripts/bench-cpu-per-op.sh [WORKLOAD] [TOTAL] [ROUNDS]
#   (defaults: put 60000 3; REGATTA_BIN picks the regatta binary)
set -euo pipefail
cd "$(dirname "$0")/.."
workload="${1:-put}"
total="${2:-60000}"
rounds="${3:-3}"
regatta="${REGATTA_BIN:-$PWD/target/release/regatta}"
[ -x "$regatta" ] || cargo build --release -q -p regatta
command -v etcd >/dev/null || { echo "needs etcd (Debian: etcd-server)" >&2; exit 1; }
work="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
ticks="$(getconf CLK_TCK)"
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

measure() { # name endpoint
    local name="$1" endpoint="$2" before after line client
    "$regatta" bench put --endpoints "$endpoint" --total 5000 >/dev/null 2>&1
    before="$(cpu "$pid")"
    line="$( { /usr/bin/time -f "client_cpu_s=%U+%S" "$regatta" bench "$workload" \
        --endpoints "$endpoint" --total "$total"; } 2>&1 | grep -E 'RESULT|client_cpu' | tr '\n' ' ')"
    after="$(cpu "$pid")"
    client="$(echo "$line" | grep -o 'client_cpu_s=[0-9.+]*')"
    echo "$name $(echo "$line" | grep -o 'requests_per_second=[0-9]*') $(echo "$line" | grep -o 'p99_ms=[0-9.]*') server_cpu_us_per_request=$(( (after - before) * 1000000 / ticks / total )) $client"
}

wait_up() { # endpoint
    for _ in $(seq 1 100); do
        "$regatta" bench put --endpoints "$1" --total 1 --clients 1 --conns 1 >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "not up: $1" >&2
    return 1
}

for _ in $(seq 1 "$rounds"); do
    rm -rf "$work/etcd"
    etcd --name e1 --data-dir "$work/etcd" \
        --listen-client-urls http://127.0.0.1:23791 --advertise-client-urls http://127.0.0.1:23791 \
        --listen-peer-urls http://127.0.0.1:23801 --initial-advertise-peer-urls http://127.0.0.1:23801 \
        --initial-cluster e1=http://127.0.0.1:23801 --log-level error >"$work/etcd.log" 2>&1 &
    pid="$!"
    wait_up 127.0.0.1:23791
    measure etcd 127.0.0.1:23791
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    rm -rf "$work/regatta"
    "$regatta" leader --dev --data-dir "$work/regatta" --api.address 127.0.0.1:18443 \
        --log-level warn >"$work/regatta.log" 2>&1 &
    pid="$!"
    wait_up 127.0.0.1:18443
    measure regatta 127.0.0.1:18443
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done

#!/usr/bin/env bash
# Where 3-node linearizable reads spend their time: starts three release
# `regatta leader` nodes on 127.0.0.1, writes 20,000 keys, then runs
# `regatta bench range` (64 clients) against each node alone, against all
# three, and serializable against all three. Results in BENCHMARKS.md.
# REGATTA_BIN runs that binary instead of target/release/regatta.
set -euo pipefail
cd "$(dirname "$0")/.."
regatta="${REGATTA_BIN:-$PWD/target/release/regatta}"
[ -x "$regatta" ] || cargo build --release -p regatta
work="$(mktemp -d)"
members="1=127.0.0.1:25011,2=127.0.0.1:25012,3=127.0.0.1:25013"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP_LOGS:-}" ] && cp $work/n*.log /tmp/; rm -rf "$work"; }
trap cleanup EXIT
for i in 1 2 3; do
    "$regatta" leader --raft.node-id "$i" --raft.address "127.0.0.1:$((25010 + i))" \
        --raft.initial-members "$members" --api.address "127.0.0.1:$((28440 + i))" \
        --data-dir "$work/n$i" --log-level warn >"$work/n$i.log" 2>&1 &
    pids+=("$!")
done
all=127.0.0.1:28441,127.0.0.1:28442,127.0.0.1:28443
for _ in $(seq 1 100); do
    "$regatta" bench put --endpoints 127.0.0.1:28441 --total 1 --clients 1 --conns 1 \
        >/dev/null 2>&1 && break
    sleep 0.1
done
echo "loading 20,000 keys"
"$regatta" bench put --endpoints "$all" --clients 64 --conns 8 --total 20000 \
    --key-space-size 10000 --val-size 256 2>/dev/null | sed -n 's/^RESULT //p'
"$regatta" status --address 127.0.0.1:28441 | head -3
for endpoints in 127.0.0.1:28441 127.0.0.1:28442 127.0.0.1:28443 "$all"; do
    echo "linearizable range via $endpoints:"
    "$regatta" bench range --endpoints "$endpoints" --clients 64 --conns 8 --total 40000 \
        --key-space-size 10000 2>/dev/null | sed -n 's/^RESULT //p'
done
echo "serializable range via $all:"
"$regatta" bench range --consistency s --endpoints "$all" --clients 64 --conns 8 \
    --total 40000 --key-space-size 10000 2>/dev/null | sed -n 's/^RESULT //p'

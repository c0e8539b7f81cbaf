# Sourced by the benchmark scripts: starts etcd and Regatta clusters on
# 127.0.0.1, fresh each time, and stops them. Expects `work` (a scratch
# directory), `regatta` (the binary) and the array `pids` to be set.
#   etcd:    client ports 23791.., peer ports 23801..
#   Regatta: API ports 28441.., Raft ports 25011..

stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}

# Refuses to start a cluster on a port something already listens on: the
# new server would fail to bind, and the run would measure whatever
# answers there (a server left over from an earlier run, say).
require_free_ports() { # port...
    local port holder
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            holder="$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'users:.*' || true)"
            echo "port $port on 127.0.0.1 is taken${holder:+ ($holder)}; stop what listens there first" >&2
            exit 1
        fi
    done
}

start_etcd() { # nodes
    local nodes="$1" cluster="" i
    for i in $(seq 1 "$nodes"); do
        require_free_ports $((23790 + i)) $((23800 + i))
    done
    for i in $(seq 1 "$nodes"); do
        cluster="${cluster:+$cluster,}e$i=http://127.0.0.1:$((23800 + i))"
    done
    for i in $(seq 1 "$nodes"); do
        rm -rf "$work/etcd$nodes-$i"
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
        require_free_ports $((25010 + i)) $((28440 + i))
    done
    for i in $(seq 1 "$nodes"); do
        members="${members:+$members,}$i=127.0.0.1:$((25010 + i))"
    done
    for i in $(seq 1 "$nodes"); do
        rm -rf "$work/regatta$nodes-$i"
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

wait_ready() { # endpoints: the first takes a put
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

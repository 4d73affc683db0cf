#!/usr/bin/env bash
# Start a Ray head and one worker node on 127.0.0.1 (the embedded default cluster).
#
#   cluster/local/start.sh            # head + 1 worker, token auth on
#   cluster/local/start.sh worker     # (re)start the worker node of a running head, e.g. after it died
#   cluster/local/stop.sh             # stop exactly these nodes
#
# Every port derives from ICL_RAY_PORT_BASE, so several clusters can share a machine,
# and each cluster keeps its files (logs, sockets, pids) under its own ICL_RAY_TEMP_DIR.
# Settings (environment):
#   ICL_RAY_TEMP_DIR      /tmp/icl-ray       Ray's --temp-dir; keep it short (socket paths < 107 bytes)
#   ICL_RAY_PORT_BASE     26380              GCS = base, dashboard / job API = base+1
#   ICL_RAY_HEAD_CPUS     1                  logical CPUs of the head (job drivers run there)
#   ICL_RAY_WORKER_CPUS   2                  logical CPUs of the worker node
#   ICL_RAY_WORKER_RESOURCES '{"worker": 1}' custom resources of the worker (JSON)
#   RAY_AUTH_MODE         token              "disabled" to turn token authentication off
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH     the token; default file ~/.ray/auth_token (made if missing)
# Prints `export RAY_ADDRESS=...` on its last line.
set -euo pipefail

RAY=${RAY:-$(command -v ray || echo "$(dirname "$0")/../../.venv/bin/ray")}
TEMP_DIR=${ICL_RAY_TEMP_DIR:-/tmp/icl-ray}
BASE=${ICL_RAY_PORT_BASE:-26380}
HEAD_CPUS=${ICL_RAY_HEAD_CPUS:-1}
WORKER_CPUS=${ICL_RAY_WORKER_CPUS:-2}
WORKER_RESOURCES=${ICL_RAY_WORKER_RESOURCES:-'{"worker": 1}'}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
TIMEOUT=${ICL_RAY_START_TIMEOUT:-90}
WHAT=${1:-all}
# Job entrypoints (`icl-router ...`) run in the nodes' environment: the tools beside `ray` come first.
export PATH="$(dirname "$RAY"):$PATH"

GCS=127.0.0.1:$BASE
DASHBOARD=http://127.0.0.1:$((BASE + 1))

running() { [[ -s $TEMP_DIR/$1.pid ]] && kill -0 "$(cat "$TEMP_DIR/$1.pid")" 2>/dev/null; }
if [[ $WHAT == all ]] && running head; then
    echo "start.sh: a cluster of $TEMP_DIR is already running (pid $(cat "$TEMP_DIR/head.pid")); run cluster/local/stop.sh first" >&2
    exit 1
elif [[ $WHAT == worker ]] && { ! running head || running worker; }; then
    echo "start.sh worker: needs a running head and no running worker in $TEMP_DIR" >&2
    exit 1
elif [[ $WHAT != all && $WHAT != worker ]]; then
    echo "usage: start.sh [all|worker]" >&2
    exit 2
fi
mkdir -p "$TEMP_DIR"

if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} && ! -s $HOME/.ray/auth_token ]]; then
    "$RAY" get-auth-token --generate >/dev/null  # writes ~/.ray/auth_token, which clients on this machine read too
fi

# node NAME WANT ARGS...: start a node with `ray start` arguments ARGS, wait until the cluster counts
# WANT alive nodes. `--block` keeps one parent per node, whose pid stop.sh signals: on SIGTERM it stops
# that node's processes and nothing else on the machine (unlike `ray stop`). Ray gives a starting node
# 30 s (hard-coded) to register with the GCS, too little on an overloaded machine: try twice.
node() {
    local name=$1 want=$2 attempt deadline
    shift 2
    for attempt in 1 2; do
        setsid "$RAY" start --block --node-ip-address=127.0.0.1 --temp-dir="$TEMP_DIR" --disable-usage-stats "$@" \
            >"$TEMP_DIR/$name.log" 2>&1 </dev/null &
        echo $! >"$TEMP_DIR/$name.pid"
        deadline=$((SECONDS + TIMEOUT))
        while running "$name" && ((SECONDS < deadline)); do
            [[ $("$RAY" list nodes --address "$DASHBOARD" --filter "state=ALIVE" --format json 2>/dev/null |
                python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null) == "$want" ]] && return 0
            sleep 1
        done
        echo "start.sh: the $name node did not come up (attempt $attempt); its log:" >&2
        tail -n 20 "$TEMP_DIR/$name.log" >&2
        running "$name" && kill -TERM "$(cat "$TEMP_DIR/$name.pid")"
        for _ in $(seq 30); do running "$name" || break; sleep 1; done  # its processes and ports are gone
    done
    [[ $WHAT == all ]] && { "$(dirname "$0")/stop.sh" >&2 || true; }
    exit 1
}

if [[ $WHAT == all ]]; then
    node head 1 --head --port="$BASE" --dashboard-host=127.0.0.1 --dashboard-port=$((BASE + 1)) \
        --ray-client-server-port=$((BASE + 2)) --dashboard-agent-listen-port=$((BASE + 3)) \
        --node-manager-port=$((BASE + 4)) --object-manager-port=$((BASE + 5)) --runtime-env-agent-port=$((BASE + 6)) \
        --dashboard-agent-grpc-port=$((BASE + 7)) --metrics-export-port=$((BASE + 8)) \
        --min-worker-port=$((BASE + 100)) --max-worker-port=$((BASE + 399)) --num-cpus="$HEAD_CPUS"
fi

# A second node on the same machine: its own agent ports, worker port range and resources.
node worker 2 --address="$GCS" --dashboard-agent-listen-port=$((BASE + 13)) \
    --node-manager-port=$((BASE + 14)) --object-manager-port=$((BASE + 15)) --runtime-env-agent-port=$((BASE + 16)) \
    --dashboard-agent-grpc-port=$((BASE + 17)) --metrics-export-port=$((BASE + 18)) \
    --min-worker-port=$((BASE + 400)) --max-worker-port=$((BASE + 699)) --num-cpus="$WORKER_CPUS" \
    --resources="$WORKER_RESOURCES"

echo "start.sh: head $GCS (dashboard and job API $DASHBOARD) + 1 worker; auth $RAY_AUTH_MODE; files in $TEMP_DIR" >&2
echo "export RAY_ADDRESS=$DASHBOARD"

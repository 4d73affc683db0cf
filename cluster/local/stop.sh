#!/usr/bin/env bash
# Stop the nodes that cluster/local/start.sh started (same ICL_RAY_TEMP_DIR), worker first.
# Signals only the pids recorded in the temp dir: other Ray clusters on the machine live on.
set -uo pipefail

TEMP_DIR=${ICL_RAY_TEMP_DIR:-/tmp/icl-ray}
GRACE=${ICL_RAY_STOP_GRACE:-20}

for name in worker head; do
    pidfile=$TEMP_DIR/$name.pid
    [[ -s $pidfile ]] || continue
    pid=$(cat "$pidfile")
    if kill -TERM "$pid" 2>/dev/null; then
        # The `ray start --block` parent stops its node's processes on SIGTERM, then exits.
        for _ in $(seq "$GRACE"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        # Still there: kill its whole process group (setsid in start.sh made it the leader).
        kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
done
echo "stop.sh: stopped the cluster in $TEMP_DIR" >&2

#!/usr/bin/env bash
# Stop the Ray head started by start_head.sh from DIR, and the nodes add_worker.sh
# joined to it, by their recorded pids. Never `ray stop`: other Ray instances on this
# machine (a test session, another head) are left alone.
#
#   cluster/local/stop_head.sh [--dir DIR] [--timeout SECONDS]
#
# Each recorded pid is a `ray start --block` process that leads its own process group:
# it gets SIGTERM (it then stops the GCS, raylet, dashboard and workers it started);
# whatever is left of its process group after the timeout gets SIGKILL.
set -euo pipefail

dir=/tmp/sdofm-ray
timeout=30
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) dir=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "stop_head.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# stop_one PIDFILE: stop the process group recorded in PIDFILE, then remove the file.
stop_one() {
    local pidfile=$1 pid
    pid=$(cat "$pidfile")
    if [[ ! "$pid" =~ ^[0-9]+$ ]]; then
        echo "stop_head.sh: $pidfile does not hold a pid" >&2
        return 1
    fi
    # A recycled pid must not be signalled: only a `ray start` leading its group qualifies.
    if kill -0 "$pid" 2>/dev/null; then
        local cmd pgid
        cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
        pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
        if [[ "$cmd" != *"ray start"* || "$pgid" != "$pid" ]]; then
            echo "stop_head.sh: pid $pid is not a ray start of this head ($cmd); left alone" >&2
            rm -f "$pidfile"
            return 0
        fi
        kill -TERM "$pid" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + timeout))
    while group_alive "$pid" && ((SECONDS < deadline)); do
        # Once the leader is gone, its group's remaining processes are ours to end too.
        if ! kill -0 "$pid" 2>/dev/null; then kill -TERM -- "-$pid" 2>/dev/null || true; fi
        sleep 0.5
    done
    if group_alive "$pid"; then
        echo "stop_head.sh: process group $pid still alive after ${timeout}s: SIGKILL" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
}

shopt -s nullglob
found=0
for pidfile in "$dir"/worker-*.pid "$dir"/head.pid; do
    found=1
    stop_one "$pidfile"
done
if ((found == 0)); then
    echo "stop_head.sh: no pid recorded in $dir: nothing to stop"
fi

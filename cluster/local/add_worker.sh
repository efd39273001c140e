#!/usr/bin/env bash
# Join a second Ray node, on this same machine, to the head start_head.sh started from
# DIR: multi-node code paths (placement across nodes, DDP between nodes, object
# transfer) without a second machine.
#
#   cluster/local/add_worker.sh [--dir DIR] [--name NAME] [--num-cpus N]
#                               [--object-store-bytes B]
#
# The node gets its own Ray temp dir (DIR/ray-NAME), random ports, the node name
# sdofm-NAME and the label sdofm-node=NAME; the pid of its `ray start --block` process
# is recorded in DIR/worker-NAME.pid, which stop_head.sh stops before the head.
set -euo pipefail

dir=/tmp/sdofm-ray
name=worker1
num_cpus=1
object_store_bytes=$((256 * 1024 * 1024))
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) dir=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --num-cpus) num_cpus=$2; shift 2 ;;
        --object-store-bytes) object_store_bytes=$2; shift 2 ;;
        -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "add_worker.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

dir=$(cd "$dir" && pwd)
if [[ ! -f "$dir/env.sh" ]] || ! kill -0 "$(cat "$dir/head.pid" 2>/dev/null)" 2>/dev/null; then
    echo "add_worker.sh: no running head recorded in $dir (start_head.sh --dir $dir first)" >&2
    exit 1
fi
pidfile=$dir/worker-$name.pid
if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "add_worker.sh: node $name is running already (pid $(cat "$pidfile"))" >&2
    exit 1
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -z "${RAY_BIN:-}" ]]; then
    if [[ -x "$repo/.venv/bin/ray" ]]; then RAY_BIN=$repo/.venv/bin/ray; else RAY_BIN=$(command -v ray); fi
fi
bin_dir=$(dirname "$RAY_BIN")
export PATH=$bin_dir:$PATH
# On SIGTERM a node first drains (for Serve replicas, up to 30 s by default); nothing
# here needs that, and it would hold every stop for the full timeout.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

# The head's address and token (RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH).
unset RAY_AUTH_TOKEN
# shellcheck source=/dev/null
source "$dir/env.sh"
head_address=$RAY_ADDRESS  # what the head's GCS advertises (the machine's IP on Linux)

# A second node on one machine must not reuse the head's fixed ports: the dashboard
# agent's HTTP port (52365 by default) is made random, as every other port already is.
setsid "$RAY_BIN" start --block \
    --address="$head_address" \
    --node-name="sdofm-$name" \
    --labels="sdofm-node=$name" \
    --num-cpus="$num_cpus" \
    --num-gpus=0 \
    --object-store-memory="$object_store_bytes" \
    --dashboard-agent-listen-port=0 \
    --temp-dir="$dir/ray-$name" \
    --disable-usage-stats \
    --log-style=record \
    </dev/null >"$dir/worker-$name.log" 2>&1 &
pid=$!
echo "$pid" >"$pidfile"

# Ready when the head's state API lists this node as ALIVE.
deadline=$((SECONDS + ${SDOFM_RAY_START_TIMEOUT:-90}))
until "$bin_dir/python" - "$RAY_API_SERVER_ADDRESS" "$RAY_AUTH_TOKEN_PATH" "sdofm-$name" <<'PY' 2>/dev/null; do
import json, sys, urllib.request
url, token_path, node_name = sys.argv[1:]
req = urllib.request.Request(
    f"{url}/api/v0/nodes?limit=1000",
    headers={"Authorization": "Bearer " + open(token_path).read().strip()},
)
nodes = json.load(urllib.request.urlopen(req, timeout=5))["data"]["result"]["result"]
assert any(n["node_name"] == node_name and n["state"] == "ALIVE" for n in nodes)
PY
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "add_worker.sh: ray start exited; the end of $dir/worker-$name.log:" >&2
        tail -n 30 "$dir/worker-$name.log" >&2
        rm -f "$pidfile"
        exit 1
    fi
    if ((SECONDS > deadline)); then
        echo "add_worker.sh: node $name did not register with the head in time" >&2
        tail -n 30 "$dir/worker-$name.log" >&2
        exit 1
    fi
    sleep 1
done
echo "Ray node $name: pid $pid, joined $head_address with $num_cpus CPU (log $dir/worker-$name.log)"

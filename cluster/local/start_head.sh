#!/usr/bin/env bash
# Start a Ray head on this machine, its dashboard and job API on 127.0.0.1, with token
# authentication on.
#
#   cluster/local/start_head.sh [--dir DIR] [--port P] [--dashboard-port P]
#                               [--client-port P] [--num-cpus N] [--object-store-bytes B]
#
# Everything this head owns lives in DIR (default /tmp/sdofm-ray): its Ray temp dir,
# the log of `ray start`, the auth token, the pid of the `ray start --block` process
# (head.pid; stop_head.sh stops exactly that process and its process group) and
# env.sh, which a client sources to reach it:
#
#   source DIR/env.sh && ray job submit --working-dir . -- python ray_jobs/...
#
# The token is read from RAY_AUTH_TOKEN_PATH when that names a file, else DIR/auth_token
# (generated on first start, mode 600). Nothing under ~/.ray is read or written.
# Keep DIR short: Ray puts unix sockets under it (107-byte path limit).
set -euo pipefail

dir=/tmp/sdofm-ray
port=6379
dashboard_port=8265
client_port=10001
num_cpus=2
object_store_bytes=$((512 * 1024 * 1024))

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) dir=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --dashboard-port) dashboard_port=$2; shift 2 ;;
        --client-port) client_port=$2; shift 2 ;;
        --num-cpus) num_cpus=$2; shift 2 ;;
        --object-store-bytes) object_store_bytes=$2; shift 2 ;;
        -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "start_head.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The Ray of this project: $RAY_BIN, else the repository's .venv, else `ray` on PATH.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -z "${RAY_BIN:-}" ]]; then
    if [[ -x "$repo/.venv/bin/ray" ]]; then RAY_BIN=$repo/.venv/bin/ray; else RAY_BIN=$(command -v ray); fi
fi
bin_dir=$(dirname "$RAY_BIN")
python=$bin_dir/python

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [[ -f "$dir/head.pid" ]] && kill -0 "$(cat "$dir/head.pid")" 2>/dev/null; then
    echo "start_head.sh: a head from $dir is running already (pid $(cat "$dir/head.pid"))" >&2
    exit 1
fi

# Written again once this head answers (the address file by `ray start`, env.sh below).
rm -f "$dir/env.sh" "$dir/ray/ray_current_cluster"

# Token authentication, explicitly: the same token file for the head, the nodes that
# join it and every client. A token in the caller's RAY_AUTH_TOKEN would take
# precedence over the file, so it is dropped for the processes started here.
token_path=${RAY_AUTH_TOKEN_PATH:-$dir/auth_token}
if [[ ! -s "$token_path" ]]; then
    (umask 077 && "$python" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$token_path")
fi
token_path=$(cd "$(dirname "$token_path")" && pwd)/$(basename "$token_path")
unset RAY_AUTH_TOKEN RAY_ADDRESS
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_path
# Job entrypoints (`python ray_jobs/...`) run in a shell on this node: make `python`
# the interpreter that runs Ray.
export PATH=$bin_dir:$PATH
# On SIGTERM a node first drains (for Serve replicas, up to 30 s by default); nothing
# here needs that, and it would hold every stop for the full timeout.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

# --block keeps `ray start` in the foreground as the parent of every process of this
# head; SIGTERM to it stops them all. setsid gives it its own process group, so the
# stop script can also reach the stragglers of exactly this head and nothing else.
# Loopback: the dashboard (job API) and the client server listen on 127.0.0.1 only.
# On Linux `ray start` replaces a loopback --node-ip-address with the machine's IP and
# the GCS listens on every interface (that is what lets add_worker.sh join); token
# authentication guards those ports.
setsid "$RAY_BIN" start --head --block \
    --node-ip-address=127.0.0.1 \
    --port="$port" \
    --ray-client-server-port="$client_port" \
    --include-dashboard=true \
    --dashboard-host=127.0.0.1 \
    --dashboard-port="$dashboard_port" \
    --dashboard-agent-listen-port=0 \
    --num-cpus="$num_cpus" \
    --num-gpus=0 \
    --object-store-memory="$object_store_bytes" \
    --temp-dir="$dir/ray" \
    --disable-usage-stats \
    --log-style=record \
    </dev/null >"$dir/head.log" 2>&1 &
pid=$!
echo "$pid" >"$dir/head.pid"

# Ready when the job API answers an authenticated request (the dashboard comes up
# after the GCS and the raylet) and `ray start` has recorded the address it advertises.
deadline=$((SECONDS + ${SDOFM_RAY_START_TIMEOUT:-90}))
until [[ -s "$dir/ray/ray_current_cluster" ]] && "$python" - "$dashboard_port" "$token_path" <<'PY' 2>/dev/null; do
import sys, urllib.request
port, token_path = sys.argv[1], sys.argv[2]
req = urllib.request.Request(
    f"http://127.0.0.1:{port}/api/jobs/",
    headers={"Authorization": "Bearer " + open(token_path).read().strip()},
)
urllib.request.urlopen(req, timeout=2).read()
PY
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "start_head.sh: ray start exited; the end of $dir/head.log:" >&2
        tail -n 30 "$dir/head.log" >&2
        rm -f "$dir/head.pid"
        exit 1
    fi
    if ((SECONDS > deadline)); then
        echo "start_head.sh: the head did not answer on 127.0.0.1:$dashboard_port in time; stopping it" >&2
        tail -n 30 "$dir/head.log" >&2
        "$(dirname "${BASH_SOURCE[0]}")/stop_head.sh" --dir "$dir" >&2 || true
        exit 1
    fi
    sleep 1
done

# The address the GCS advertises (the machine's IP on Linux, see above).
address=$(cat "$dir/ray/ray_current_cluster")
cat >"$dir/env.sh" <<EOF
# Source me to talk to the Ray head started from $dir (pid $pid).
export RAY_ADDRESS=$address
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$token_path
EOF

echo "Ray head: pid $pid, GCS $address, dashboard http://127.0.0.1:$dashboard_port"
echo "  token: $token_path    client settings: source $dir/env.sh"

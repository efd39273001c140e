#!/usr/bin/env bash
# A two-node Ray cluster on this machine whose nodes share nothing but the network:
# the shared-nothing production layout (object storage, a tracking server, node
# disks private) in miniature, so that a path only one node can see fails here as it
# would on a real cluster. Needs root (network and mount namespaces).
#
#   cluster/local/netns_cluster.sh up   [--dir DIR] [--head-cpus N] [--worker-cpus N]
#                                       [--object-store-bytes B] [--bucket NAME]
#   cluster/local/netns_cluster.sh worker [--dir DIR]   # (re)join the worker node
#   cluster/local/netns_cluster.sh down [--dir DIR] [--timeout SECONDS]
#
# Network: a bridge sdofm-br0 with 10.213.7.1/29 on this machine, and one network
# namespace per node joined to it by a veth pair: sdofm-head (10.213.7.2) and
# sdofm-worker (10.213.7.3), each with a hosts file naming both (/etc/netns/NS/hosts,
# the cluster's DNS) and a default route via the bridge. Services, all reached over that link:
#   S3       moto_server on 10.213.7.1:9000 (outside the cluster, as a cloud bucket is),
#            bucket NAME (default sdofm)
#   MLflow   `sdofm mlflow` on the head, 10.213.7.2:5000: runs in a SQLite database on
#            the head's disk, artifacts in s3://NAME/mlflow-artifacts (proxied)
#   Ray      head GCS 10.213.7.2:6379, job API http://10.213.7.2:8265 (token auth on)
# Disks: every node process runs in its own mount namespace in which /tmp, /var/tmp,
# /dev/shm, $HOME and the top folder of this checkout are the node's own (DIR/NODE/...
# on this machine); the checkout, its data, caches and mlflow.db are not there. Only
# the Python environment that runs Ray (the venv and its base interpreter) is visible,
# read-only, at its usual path: the "image" of the node. Code reaches the nodes through
# `ray job submit --working-dir .`. Each node gets the settings a cloud node would:
# AWS_ENDPOINT_URL (+ test credentials) and MLFLOW_TRACKING_URI.
#
# `up` prints the settings to use and writes them to DIR/env.sh:
#   source DIR/env.sh && ray job submit --working-dir . -- python ray_jobs/...
# `down` stops exactly what `up` started (by the pids in DIR/*.pid, then their process
# groups), deletes the namespaces, the bridge and the node folders; logs stay in DIR.
set -euo pipefail
set -E  # the ERR trap of `up` also fires inside functions

self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cmd=${1:-}
[[ $# -gt 0 ]] && shift
dir=/tmp/sdofm-netns
head_cpus=2
worker_cpus=2
object_store_bytes=$((256 * 1024 * 1024))
bucket=sdofm
timeout=30
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) dir=$2; shift 2 ;;
        --head-cpus) head_cpus=$2; shift 2 ;;
        --worker-cpus) worker_cpus=$2; shift 2 ;;
        --object-store-bytes) object_store_bytes=$2; shift 2 ;;
        --bucket) bucket=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --) shift; break ;;
        -h | --help) sed -n '2,32p' "$0"; exit 0 ;;
        *) [[ $cmd == _enter ]] && break
           echo "netns_cluster.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

BRIDGE=sdofm-br0
NET=10.213.7
HOST_IP=$NET.1
HEAD_IP=$NET.2
WORKER_IP=$NET.3
S3_PORT=9000
MLFLOW_PORT=5000
GCS_PORT=6379
DASHBOARD_PORT=8265
NODES=(head worker)
declare -A NODE_IP=([head]=$HEAD_IP [worker]=$WORKER_IP)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
case "$cmd" in up | down | worker | _enter) ;; *) sed -n '2,32p' "$0"; exit 2 ;; esac
# The Ray of this project: $RAY_BIN, else the repository's .venv, else `ray` on PATH.
if [[ -z "${RAY_BIN:-}" ]]; then
    if [[ -x "$repo/.venv/bin/ray" ]]; then RAY_BIN=$repo/.venv/bin/ray
    elif ! RAY_BIN=$(command -v ray); then
        echo "netns_cluster.sh: no ray found: set RAY_BIN=/path/to/venv/bin/ray" >&2; exit 1
    fi
fi
bin_dir=$(dirname "$RAY_BIN")
python=$bin_dir/python
venv=$(cd "$bin_dir/.." && pwd)

say() { echo "netns_cluster.sh: $*" >&2; }

# _enter NODE CMD...: inside the node's network namespace (ip netns exec) and a fresh
# private mount namespace (unshare), give the node its own disks, then exec CMD.
if [[ $cmd == _enter ]]; then
    node=$1; shift
    node_dir=$dir/$node
    # Read-only "image": the venv and the interpreter it was made from, at their paths.
    base=$("$python" -c 'import sys; print(sys.base_prefix)')
    image=("$venv" "$base")
    # Private: the top folders holding the checkout, the venv and $HOME, and the temp dirs.
    hide=()
    for p in "$repo" "$venv" "$HOME"; do
        top=/$(echo "$p" | cut -d/ -f2)
        case "$top" in
            /usr | /etc | /bin | /sbin | /lib | /lib64 | /proc | /sys | /dev | /run | /)
                say "refusing to hide $top (holds $p)"; exit 1 ;;
        esac
        [[ " ${hide[*]} " == *" $top "* ]] || hide+=("$top")
    done
    hide+=(/var/tmp)
    # Every mount the node gets is staged in the node's own /tmp first, while each source
    # (under DIR, often itself under /tmp) is still in sight; then that folder becomes the
    # node's /tmp and each staged mount is moved into place: the private folders, then
    # the image (which may lie inside one of them, or inside /tmp), so nothing covers it.
    stage=$node_dir/disk/tmp/.mounts
    sources=() targets=()
    for t in "${hide[@]}"; do
        [[ $t == /tmp ]] && continue
        mkdir -p "$node_dir/disk$t"
        sources+=("$node_dir/disk$t") targets+=("$t")
    done
    for p in "${image[@]}"; do sources+=("$p") targets+=("$p"); done
    for k in "${!sources[@]}"; do
        mkdir -p "$stage/$k"
        mount --rbind "${sources[$k]}" "$stage/$k"
    done
    mount --rbind "$node_dir/disk/tmp" /tmp
    for k in "${!targets[@]}"; do
        mkdir -p "${targets[$k]}"
        mount --move "/tmp/.mounts/$k" "${targets[$k]}"
    done
    for p in "${image[@]}"; do mount -o remount,bind,ro "$p"; done
    rmdir /tmp/.mounts/* /tmp/.mounts 2>/dev/null || true  # empty now; never rm -r here
    mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm  # the node's own object store
    if [[ -d "$dir" ]]; then mount -t tmpfs -o size=1m tmpfs "$dir"; fi  # DIR elsewhere
    if [[ -e "$repo/cluster/local" ]]; then say "the node still sees the checkout $repo"; exit 1; fi
    hostname "sdofm-$node"
    export HOME=${HOME:-/root}
    cd "$HOME"
    exec "$@"
fi

need_root() {
    if [[ $(id -u) != 0 ]]; then say "needs root (network and mount namespaces)"; exit 1; fi
}

# node_run NODE LOG CMD...: start CMD as a node process in the background, leading its
# own process group; prints its pid.
node_run() {
    local node=$1 log=$2; shift 2
    setsid ip netns exec "sdofm-$node" unshare --mount --uts --propagation private -- \
        "$self" _enter --dir "$dir" -- "$node" "$@" </dev/null >"$log" 2>&1 &
    echo $!
}

# node_env NODE: the environment every process of a node gets (what a cloud node's
# instance profile and config map provide).
node_env() {
    echo "PATH=$bin_dir:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    echo "AWS_ENDPOINT_URL=http://$HOST_IP:$S3_PORT"
    echo "AWS_ACCESS_KEY_ID=testing"
    echo "AWS_SECRET_ACCESS_KEY=testing"
    echo "AWS_DEFAULT_REGION=us-east-1"
    echo "MLFLOW_TRACKING_URI=http://$HEAD_IP:$MLFLOW_PORT"
    echo "RAY_AUTH_MODE=token"
    echo "RAY_AUTH_TOKEN_PATH=$HOME/.sdofm_ray_token"
    echo "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0"
    echo "HOME=$HOME"
    echo "LANG=C.UTF-8"
}

# A process that is gone but not reaped (a zombie: this container's pid 1 does not reap
# orphans) answers `kill -0`; these say whether it still runs.
alive() {  # alive PID
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}
group_alive() {  # group_alive PGID
    ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^[ZX]/ {found = 1} END {exit !found}'
}

wait_for() {  # wait_for WHAT PID TIMEOUT LOG CHECK...
    local what=$1 pid=$2 limit=$3 log=$4; shift 4
    local deadline=$((SECONDS + limit))
    until "$@" 2>/dev/null; do
        if ! alive "$pid"; then
            say "$what exited; the end of $log:"; tail -n 30 "$log" >&2; return 1
        fi
        if ((SECONDS > deadline)); then
            say "$what not ready in ${limit}s; the end of $log:"; tail -n 30 "$log" >&2; return 1
        fi
        sleep 1
    done
}

http_ok() {  # http_ok URL [TOKEN_FILE]
    "$python" - "$@" <<'PY'
import sys, urllib.request
headers = {"Authorization": "Bearer " + open(sys.argv[2]).read().strip()} if len(sys.argv) > 2 else {}
urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=3).read()
PY
}

worker_alive() {
    "$python" - "http://$HEAD_IP:$DASHBOARD_PORT" "$dir/auth_token" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(
    f"{sys.argv[1]}/api/v0/nodes?limit=1000",
    headers={"Authorization": "Bearer " + open(sys.argv[2]).read().strip()},
)
nodes = json.load(urllib.request.urlopen(req, timeout=5))["data"]["result"]["result"]
assert any(n["node_name"] == "sdofm-worker" and n["state"] == "ALIVE" for n in nodes)
PY
}

ray_node() {  # ray_node NODE: start (or restart) the Ray node of NODE
    local node=$1 pid
    local -a args=(
        --block --node-ip-address="${NODE_IP[$node]}" --node-name="sdofm-$node"
        --labels="sdofm-node=$node" --num-gpus=0 --object-store-memory="$object_store_bytes"
        --disable-usage-stats --log-style=record
    )
    if [[ $node == head ]]; then
        args+=(--head --port=$GCS_PORT --num-cpus="$head_cpus" --include-dashboard=true
            --dashboard-host="$HEAD_IP" --dashboard-port=$DASHBOARD_PORT)
    else
        args+=(--address="$HEAD_IP:$GCS_PORT" --num-cpus="$worker_cpus")
    fi
    pid=$(node_run "$node" "$dir/$node.log" env -i $(node_env) "$RAY_BIN" start "${args[@]}")
    echo "$pid" >"$dir/$node.pid"
    if [[ $node == head ]]; then
        wait_for "the Ray head" "$pid" 300 "$dir/head.log" \
            http_ok "http://$HEAD_IP:$DASHBOARD_PORT/api/jobs/" "$dir/auth_token"
    else
        wait_for "the Ray worker node" "$pid" 300 "$dir/worker.log" worker_alive
    fi
}

up() {
    need_root
    if ip netns list | grep -qw "sdofm-head"; then
        say "a cluster is up already (netns sdofm-head); run down first"; exit 1
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # Anything that fails below leaves a state `down` can clean.
    trap 'say "up failed; cleaning up"; "$self" down --dir "$dir" >&2 || true' ERR

    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_IP/29" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for node in "${NODES[@]}"; do
        local ns=sdofm-$node host_end=sdofm-${node:0:1}0
        ip netns add "$ns"
        ip link add "$host_end" type veth peer name eth0 netns "$ns"
        ip link set "$host_end" master "$BRIDGE" up
        ip -n "$ns" addr add "${NODE_IP[$node]}/29" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        # A default route (nowhere beyond the bridge) lets Ray find the node's address the
        # way it does on a cloud VM; the hosts file (ip netns exec mounts it on /etc/hosts)
        # is the cluster's DNS: gloo and NCCL bind the address the hostname resolves to,
        # and fall back to 127.0.0.1, which the other node cannot reach, when it does not.
        ip -n "$ns" route add default via "$HOST_IP"
        mkdir -p "/etc/netns/$ns"
        {
            echo "127.0.0.1 localhost"
            for n in "${NODES[@]}"; do echo "${NODE_IP[$n]} sdofm-$n"; done
        } >"/etc/netns/$ns/hosts"
        mkdir -p "$dir/$node/disk$HOME"
    done

    # The cluster's token: one file, copied to each node (as `ray up` copies it).
    if [[ ! -s "$dir/auth_token" ]]; then
        (umask 077 && "$python" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$dir/auth_token")
    fi
    for node in "${NODES[@]}"; do
        install -m 600 "$dir/auth_token" "$dir/$node/disk$HOME/.sdofm_ray_token"
    done

    # Object storage, outside the cluster.
    local pid
    setsid "$bin_dir/moto_server" -H "$HOST_IP" -p $S3_PORT </dev/null >"$dir/s3.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/s3.pid"
    wait_for "moto_server" "$pid" 60 "$dir/s3.log" http_ok "http://$HOST_IP:$S3_PORT/moto-api/"
    "$python" - "http://$HOST_IP:$S3_PORT" "$bucket" <<'PY'
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="testing",
             aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=sys.argv[2])
PY

    # The tracking server on the head: sdofm as installed in the head's image (a copy of
    # this checkout's package on the head's disk; the checkout itself is not there).
    mkdir -p "$dir/head/disk$HOME/image" "$dir/head/disk$HOME/mlflow"
    cp -r "$repo/sdofm" "$dir/head/disk$HOME/image/"
    pid=$(node_run head "$dir/mlflow.log" env -i $(node_env) PYTHONPATH="$HOME/image" \
        "$python" -m sdofm.cli mlflow --host "$HEAD_IP" --port $MLFLOW_PORT \
        --backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db" \
        --artifacts-destination "s3://$bucket/mlflow-artifacts" --workers 1)
    echo "$pid" >"$dir/mlflow.pid"

    # The Ray nodes start while the tracking server does (each takes tens of seconds).
    ray_node head
    echo "Ray head ready after ${SECONDS}s"
    ray_node worker
    echo "Ray worker node ready after ${SECONDS}s"
    wait_for "the MLflow server" "$(cat "$dir/mlflow.pid")" 300 "$dir/mlflow.log" \
        http_ok "http://$HEAD_IP:$MLFLOW_PORT/health"
    echo "MLflow server ready after ${SECONDS}s"
    trap - ERR

    cat >"$dir/env.sh" <<EOF
# Source me to use the netns cluster started from $dir.
export RAY_ADDRESS=http://$HEAD_IP:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$dir/auth_token
export MLFLOW_TRACKING_URI=http://$HEAD_IP:$MLFLOW_PORT
export AWS_ENDPOINT_URL=http://$HOST_IP:$S3_PORT
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export SDOFM_BUCKET=s3://$bucket
EOF
    echo "netns cluster up: head $HEAD_IP (pid $(cat "$dir/head.pid")), worker $WORKER_IP (pid $(cat "$dir/worker.pid"))"
    echo "  S3 http://$HOST_IP:$S3_PORT (bucket $bucket), MLflow http://$HEAD_IP:$MLFLOW_PORT"
    echo "  client settings: source $dir/env.sh"
    echo "RAY_ADDRESS=http://$HEAD_IP:$DASHBOARD_PORT"
}

# stop_one NAME: stop the process group recorded in DIR/NAME.pid, then remove the file.
stop_one() {
    local pidfile=$dir/$1.pid pid
    [[ -f "$pidfile" ]] || return 0
    pid=$(cat "$pidfile")
    if [[ ! "$pid" =~ ^[0-9]+$ ]]; then say "$pidfile does not hold a pid"; return 1; fi
    # A recycled pid must not be signalled: only a group leader started by this script
    # (its command line names ray, mlflow or moto) qualifies.
    if alive "$pid"; then
        local cmdline pgid
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
        pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
        if [[ ! "$cmdline" =~ (ray|mlflow|moto|netns_cluster) || "$pgid" != "$pid" ]]; then
            say "pid $pid is not a process this script started ($cmdline); left alone"
            rm -f "$pidfile"
            return 0
        fi
        kill -TERM "$pid" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + timeout))
    while group_alive "$pid" && ((SECONDS < deadline)); do
        if ! alive "$pid"; then kill -TERM -- "-$pid" 2>/dev/null || true; fi
        sleep 0.5
    done
    if group_alive "$pid"; then
        say "process group $pid ($1) still alive after ${timeout}s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
    echo "stopped $1 (pid $pid)"
}

down() {
    need_root
    [[ -d "$dir" ]] && dir=$(cd "$dir" && pwd)
    for name in worker head mlflow s3; do stop_one "$name"; done
    for node in "${NODES[@]}"; do
        if ip netns list | grep -qw "sdofm-$node"; then
            # A process still inside would keep the namespace's network alive: name it.
            local left
            left=$(ip netns pids "sdofm-$node" 2>/dev/null | tr '\n' ' ')
            [[ -n "$left" ]] && say "processes left in sdofm-$node: $left (not ours to kill)"
            ip netns del "sdofm-$node"
            echo "removed netns sdofm-$node"
        fi
        ip link del "sdofm-${node:0:1}0" 2>/dev/null || true
        rm -rf "/etc/netns/sdofm-$node"
        rm -rf "${dir:?}/$node"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
        echo "removed bridge $BRIDGE"
    fi
    rm -f "$dir/env.sh" "$dir/auth_token"
}

case "$cmd" in
    up) up ;;
    down) down ;;
    worker)
        need_root
        dir=$(cd "$dir" && pwd)
        if [[ -f "$dir/worker.pid" ]] && alive "$(cat "$dir/worker.pid")"; then
            say "the worker node is running (pid $(cat "$dir/worker.pid"))"; exit 1
        fi
        rm -rf "$dir/worker/disk/tmp"  # a node that comes back starts with an empty /tmp
        ray_node worker
        echo "worker node rejoined: pid $(cat "$dir/worker.pid")"
        ;;
    *) sed -n '2,32p' "$0"; exit 2 ;;
esac

"""A Ray job for tests/test_netns_cluster.py: what each node of the netns cluster sees.

    ray job submit --working-dir . -- python tests/netns_probe.py CHECKOUT HOST_FILE BUCKET_URL

One task per node (label ``sdofm-node``): its hostname and Ray node, what of the
submitting machine's checkout it lists, whether a file that machine wrote is visible,
where ``sdofm`` was imported from, and whether the tracking server and the object store
answer. The worker writes a file to its /tmp; the head then looks for it. Prints one ``PROBE {json}`` line.
"""

import json
import os
import socket
import sys
import urllib.request

import ray


@ray.remote(num_cpus=0.1)
def look(checkout: str, host_file: str, bucket: str, other_tmp_file: str | None) -> dict:
    import fsspec

    import sdofm

    mlflow = os.environ["MLFLOW_TRACKING_URI"]
    health = urllib.request.urlopen(f"{mlflow}/health", timeout=10).read().decode()
    fs, root = fsspec.core.url_to_fs(bucket)
    mine = f"/tmp/sdofm-probe-{socket.gethostname()}"
    with open(mine, "w") as f:
        f.write("node-local")
    return {
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        # What of the checkout this node sees: nothing, or only the folder its read-only
        # Python image (the venv) is mounted at when the venv lives in the checkout.
        "checkout": sorted(os.listdir(checkout)) if os.path.isdir(checkout) else None,
        "host_file": os.path.exists(host_file),
        "other_tmp_file": os.path.exists(other_tmp_file) if other_tmp_file else None,
        "mine": mine,
        "sdofm": sdofm.__file__,
        "mlflow": health.strip(),
        "s3": fs.exists(root),
    }


ray.init()
args = sys.argv[1:4]
worker = ray.get(look.options(label_selector={"sdofm-node": "worker"}).remote(*args, None))
head = ray.get(look.options(label_selector={"sdofm-node": "head"}).remote(*args, worker["mine"]))
print("PROBE " + json.dumps({"head": head, "worker": worker}))

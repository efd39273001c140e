"""The shared-nothing cluster: ``cluster/local/netns_cluster.sh`` starts a Ray head and a
worker node in their own network and mount namespaces, with object storage (moto's S3
server) and an MLflow tracking server as the only state they share. Jobs are submitted
from this machine with ``ray job submit --working-dir .`` as on a real cluster; every
path one node writes and another reads must go through S3 or MLflow, or these tests fail.

Needs root (``ip netns``, ``unshare``); without it every test skips and says why.
The whole module runs ~10 jobs against one cluster: it is the slowest file of the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster/local/netns_cluster.sh"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
BUCKET = "sdofm"
ARCHIVE = f"s3://{BUCKET}/sdoml/synthetic"
CACHE = f"s3://{BUCKET}/cache"
RESULTS = f"s3://{BUCKET}/ray_results"
NAMESPACES = ("sdofm-head", "sdofm-worker")

pytestmark = pytest.mark.ray


def _cannot_make_namespaces() -> str | None:
    """Why this machine cannot host the cluster, or None."""
    if os.environ.get("SDOFM_NETNS_TESTS") != "1":
        # About 8 minutes of a 2-core machine: `make test-netns` (CI runs it after
        # `make test`), not part of every `make test`.
        return "set SDOFM_NETNS_TESTS=1 to run the two-node cluster tests (make test-netns)"
    if os.geteuid() != 0:
        return "needs root for network and mount namespaces"
    for tool in ("ip", "unshare", "setsid"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if any(ns in listed.stdout for ns in NAMESPACES):
        return "a netns cluster is running already (ip netns list shows sdofm-head)"
    probe = f"sdofm-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    mnt = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if mnt.returncode != 0:
        return f"unshare --mount failed: {mnt.stderr.strip()}"
    return None


def _read_env_sh(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(.*)$", path.read_text(), re.M))


class NetnsCluster:
    """The cluster ``netns_cluster.sh up`` started; ``env`` is a client's environment."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env

    def run(self, *args: str, timeout: float = 120, check: bool = True):
        return subprocess.run(
            list(args), env=self.env, cwd=REPO, capture_output=True, text=True,
            timeout=timeout, check=check,
        )  # fmt: skip

    def submit(self, entrypoint: list[str], wait: bool = True, timeout: float = 1200) -> str:
        """``ray job submit --working-dir .`` from the repository root; the submission id."""
        sid = f"sdofm-netns-{uuid.uuid4().hex[:8]}"
        cmd = [RAY, "job", "submit", "--submission-id", sid, "--working-dir", "."]
        cmd += [] if wait else ["--no-wait"]
        try:
            self.run(*cmd, "--", *entrypoint, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            self.run(RAY, "job", "stop", sid, check=False)
            pytest.fail(f"job {sid} did not end in {timeout} s:\n{self.logs(sid)[-4000:]}")
        return sid

    def job(self, sid: str) -> dict:
        """The state API's record of submission ``sid`` (status, Ray job id, ...)."""
        jobs = json.loads(self.run(RAY, "list", "jobs", "--detail", "--format", "json").stdout)
        return next(j for j in jobs if j.get("submission_id") == sid)

    def status(self, sid: str) -> str:
        return self.job(sid)["status"]

    def logs(self, sid: str) -> str:
        return self.run(RAY, "job", "logs", sid, check=False).stdout

    def succeeded(self, sid: str) -> str:
        """The job's logs, after asserting it succeeded."""
        logs = self.logs(sid)
        assert self.status(sid) == "SUCCEEDED", logs[-5000:]
        return logs

    def pid(self, name: str) -> int:
        return int((self.root / f"{name}.pid").read_text())

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(self.env["MLFLOW_TRACKING_URI"])

    def s3(self):
        import fsspec

        return fsspec.filesystem(
            "s3",
            key="testing",
            secret="testing",
            client_kwargs={
                "endpoint_url": self.env["AWS_ENDPOINT_URL"],
                "region_name": "us-east-1",
            },
        )


@pytest.fixture(scope="module")
def netns_cluster(synth_root, tmp_path_factory):
    why = _cannot_make_namespaces()
    if why:
        pytest.skip(f"no netns cluster on this machine: {why}")
    # Short: Ray's unix sockets live under each node's /tmp, which is DIR/NODE/disk/tmp.
    root = Path("/tmp/sdofm-netns-test")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    base["RAY_BIN"] = RAY
    t0 = time.perf_counter()
    down = [str(SCRIPT), "down", "--dir", str(root)]
    try:
        up = subprocess.run(
            [str(SCRIPT), "up", "--dir", str(root), "--bucket", BUCKET],
            env=base, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert up.returncode == 0, f"netns_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        print(up.stdout, f"up in {time.perf_counter() - t0:.0f} s")
        address = re.search(r"^RAY_ADDRESS=(\S+)$", up.stdout, re.M).group(1)
        env = {**base, **_read_env_sh(root / "env.sh")}
        assert env["RAY_ADDRESS"] == address == "http://10.213.7.2:8265"
        cluster = NetnsCluster(root, env)
        # The archive, as a public bucket would hold it (written once per session here).
        fs = cluster.s3()
        fs.put(str(synth_root) + "/", ARCHIVE.removeprefix("s3://") + "/", recursive=True)
        yield cluster
    finally:
        pids = [int(p.read_text()) for p in root.glob("*.pid")]
        stopped = subprocess.run(down, env=base, capture_output=True, text=True, timeout=200)
        print(stopped.stdout, stopped.stderr)
        for log in sorted(root.glob("*.log")):  # what each service said, for a failed run
            print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-15:]))
        # No process of a group it started still runs (a zombie is gone, merely not
        # reaped: this container's pid 1 does not reap orphans).
        table = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True)
        rows = [line.split() for line in table.stdout.splitlines()]
        running = [r for r in rows if int(r[1]) in pids and not r[2].startswith("Z")]
        assert not running, running
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(ns in left for ns in NAMESPACES), left
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        assert "sdofm-" not in links, links
        shutil.rmtree(root, ignore_errors=True)


def _data(*extra: str) -> list[str]:
    return [f"data.root={ARCHIVE}", f"data.cache_dir={CACHE}", *extra]


PRETRAIN = [
    "python", "ray_jobs/pretrain.py", "--config", "configs/pretrain/mae_debug.yaml",
    *_data(), f"train.storage_path={RESULTS}", "train.run_name=netns-pretrain",
    "scaling.placement_strategy=STRICT_SPREAD", "train.checkpoint_every=5",
    "train.val_every=10", "train.val_samples=8", "train.log_every=5",
]  # fmt: skip


def test_netns_nodes_share_nothing_but_services(netns_cluster, tmp_path):
    """A job's tasks on both nodes: neither sees the checkout or this machine's files, a
    file one node writes to /tmp is not on the other, code comes from the job's working
    dir, and both reach the tracking server and the object store."""
    host_file = tmp_path / "only-on-the-submitting-machine"
    host_file.write_text("x")
    sid = netns_cluster.submit(
        ["python", "tests/netns_probe.py", str(REPO), str(host_file), f"s3://{BUCKET}"]
    )
    logs = netns_cluster.succeeded(sid)
    probe = json.loads(re.search(r"^PROBE (.*)$", logs, re.M).group(1))
    head, worker = probe["head"], probe["worker"]
    assert (head["host"], worker["host"]) == ("sdofm-head", "sdofm-worker")
    assert head["node_id"] != worker["node_id"]
    # A venv inside the checkout is the node's image, mounted at its own path: the
    # checkout's folder then exists on the node, holding that mount point and nothing else.
    venv = BIN.parent
    image = {venv.relative_to(REPO).parts[0]} if venv.is_relative_to(REPO) else set()
    for node in (head, worker):
        assert node["checkout"] is None or set(node["checkout"]) <= image, node
        assert node["host_file"] is False, node
        assert "runtime_resources/working_dir_files" in node["sdofm"], node
        assert node["mlflow"] == "OK" and node["s3"] is True, node
    assert head["other_tmp_file"] is False, "the head sees a file of the worker's /tmp"
    assert not Path(worker["mine"]).exists(), "this machine sees a node's /tmp"


def test_netns_pretrain_tracked_on_the_server_and_resumed_from_s3(netns_cluster):
    """Data preparation, then mae_debug with one train worker per node; everything a later
    step needs is on S3 or the tracking server. A re-submitted job continues the run."""
    c = netns_cluster
    sid = c.submit(["python", "ray_jobs/prepare_data.py", "--config",
                    "configs/pretrain/mae_debug.yaml", *_data()])  # fmt: skip
    logs = c.succeeded(sid)
    assert re.search(rf"Index: {CACHE}/index-\w+\.parquet", logs), logs[-3000:]
    assert re.search(rf"Statistics: {CACHE}/stats-\w+\.json", logs), logs[-3000:]

    sid = c.submit([*PRETRAIN, "train.max_steps=10"])
    logs = c.succeeded(sid)
    run_id = re.search(r"MLflow run id: (\w+)", logs).group(1)
    ckpt = re.search(r"Checkpoint: (\S+)", logs).group(1)
    assert ckpt == f"{RESULTS}/netns-pretrain/checkpoint_00000010", ckpt
    fs = c.s3()
    assert fs.exists(ckpt.removeprefix("s3://") + "/state.json")

    # One train worker on each node.
    job_id = c.job(sid)["job_id"]
    actors = json.loads(
        c.run(RAY, "list", "actors", "--detail", "--format", "json", "--limit", "10000",
              "--filter", "class_name=RayTrainWorker").stdout
    )  # fmt: skip
    nodes = {a["node_id"] for a in actors if a["job_id"] == job_id}
    assert len(nodes) == 2, actors

    client = c.mlflow()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mae_debug"
    assert run.data.params["derived.world_size"] == "2"
    val = client.get_metric_history(run_id, "val/loss_171A")
    assert [m.step for m in val] == [10], val
    figures = [a.path for a in client.list_artifacts(run_id, "reconstructions")]
    assert figures == ["reconstructions/step_00000010_0.png"], figures
    model_uri = run.data.tags["sdofm.model_uri"]
    assert model_uri, run.data.tags
    # Artifacts went through the server into the bucket, not onto a node's disk.
    assert fs.glob(f"{BUCKET}/mlflow-artifacts/**/step_00000010_0.png"), "figure not in S3"

    # Re-submitted with more steps: the same run continues from its S3 checkpoint.
    sid = c.submit([*PRETRAIN, "train.max_steps=15"])
    logs = c.succeeded(sid)
    assert "continuing run 'netns-pretrain' from step 10" in logs, logs[-4000:]
    assert re.search(r"MLflow run id: (\w+)", logs).group(1) == run_id
    assert re.search(r"Checkpoint: (\S+)", logs).group(1).endswith("checkpoint_00000015")
    # Every fifth step logged once, none missing, none twice; the run records its resume.
    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == [5, 10, 15], loss
    assert "resumed at step 10 (epoch" in logs, logs[-4000:]
    assert client.get_run(run_id).data.tags["sdofm.resumed_at_step"] == "10"
    assert [m.step for m in client.get_metric_history(run_id, "val/loss_171A")] == [10, 15]


def _wait(what: str, check, timeout: float, every: float = 3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def _runs(client, experiment: str, filter_string: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string) if exp else []


SWEEP = [
    "python", "ray_jobs/tune.py", "--config", "configs/tune/dimming.yaml", *_data(),
    f"train.storage_path={RESULTS}", "transform.size=32", "tune.name=netns-sweep",
    "finetune.epochs=2", "tune.grace_period=2", "tune.space={lr: {loguniform: [3.0e-4, 2.0e-3]}}",
    # A trial (0.25 CPU + a 1-CPU train worker) per node of 2 logical CPUs at a time.
    "tune.trial_cpus=0.25", "scaling.cpus_per_worker=1", "--num-samples", "3",
    "--max-concurrent", "2",
]  # fmt: skip


def test_netns_sweep_on_both_nodes_resumes_after_its_driver_is_killed(netns_cluster):
    """A dimming sweep on the pretrained backbone: trials on both nodes; its driver is
    killed once a trial has finished; ``--resume`` finishes the sweep keeping that trial."""
    c = netns_cluster
    client = c.mlflow()
    pre = _runs(client, "sdofm-pretrain", "attributes.run_name = 'netns-pretrain'")
    if not pre:
        pytest.skip(
            "needs the run of test_netns_pretrain_tracked_on_the_server_and_resumed_from_s3"
        )
    sweep = [*SWEEP, "--backbone", pre[0].info.run_id]

    sid = c.submit(sweep, wait=False)

    def finished_children():
        if c.status(sid) in ("SUCCEEDED", "FAILED", "STOPPED"):
            pytest.fail(f"the sweep ended before it could be interrupted:\n{c.logs(sid)[-4000:]}")
        return [
            r
            for r in _runs(client, "sdofm-dimming", "tags.`sdofm.task` = 'tune-dimming-trial'")
            if r.info.status == "FINISHED"
        ]

    done = _wait("a finished trial", finished_children, timeout=900)
    c.run(RAY, "job", "stop", sid)  # SIGTERM, then SIGKILL, to the sweep's driver
    _wait("the driver stopped", lambda: c.status(sid) in ("STOPPED", "FAILED"), timeout=120)
    kept = {r.info.run_name: r.info.run_id for r in done}

    job_id = c.job(sid)["job_id"]
    actors = json.loads(
        c.run(RAY, "list", "actors", "--detail", "--format", "json", "--limit", "10000",
              "--filter", "class_name=RayTrainWorker").stdout
    )  # fmt: skip
    nodes = {a["node_id"] for a in actors if a["job_id"] == job_id and a["node_id"]}
    assert len(nodes) == 2, f"trials on one node: {actors}"

    resumed = c.submit([*sweep, "--resume"], timeout=900)
    logs = c.succeeded(resumed)
    assert "resuming sweep 'netns-sweep'" in logs, logs[-4000:]
    parents = _runs(client, "sdofm-dimming", "attributes.run_name = 'netns-sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    children = _runs(client, "sdofm-dimming", "tags.`sdofm.task` = 'tune-dimming-trial'")
    names = [r.info.run_name for r in children]
    assert len(names) == len(set(names)) == 3, names  # one run per trial, none twice
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    by_name = {r.info.run_name: r for r in children}
    for name, run_id in kept.items():  # finished before the kill: kept, not trained again
        assert by_name[name].info.run_id == run_id
        epochs = [m.step for m in client.get_metric_history(run_id, "val/mae")]
        assert epochs == sorted(set(epochs)), epochs
    assert all(r.info.status == "FINISHED" for r in children), [r.info for r in children]


def test_netns_pretraining_survives_the_loss_of_the_worker_node(netns_cluster):
    """The worker node's Ray processes are SIGKILLed mid-run; the node comes back; the run
    finishes from its last S3 checkpoint as one MLflow run with one value per step."""
    import signal

    c = netns_cluster
    name = "netns-node-loss"
    sid = c.submit(
        [*PRETRAIN, f"train.run_name={name}", "train.epochs=3", "train.max_steps=25",
         "train.max_failures=3", "train.val_every=25", "tracking.log_model=false"],
        wait=False,
    )  # fmt: skip
    fs = c.s3()
    first = f"{RESULTS.removeprefix('s3://')}/{name}/checkpoint_00000005/state.json"
    _wait("the first checkpoint on S3", lambda: fs.exists(first) or fs.invalidate_cache(), 600)

    # The node is gone: its `ray start` process group, then by pid whatever of the node
    # left that group (every process in the worker's network namespace is the node's).
    os.killpg(c.pid("worker"), signal.SIGKILL)

    def gone():
        left = subprocess.run(["ip", "netns", "pids", "sdofm-worker"], capture_output=True)
        for pid in left.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:  # it exited between the listing and the kill
                pass
        return not left.stdout.split()

    _wait("every process of the worker node gone", gone, timeout=30, every=1)
    rejoin = subprocess.run(
        [str(SCRIPT), "worker", "--dir", str(c.root)], env=c.env, capture_output=True,
        text=True, timeout=400,
    )  # fmt: skip
    assert rejoin.returncode == 0, rejoin.stdout + rejoin.stderr

    _wait("the job's end", lambda: c.status(sid) in ("SUCCEEDED", "FAILED", "STOPPED"), 900)
    logs = c.succeeded(sid)
    assert re.search(r"Checkpoint: \S+/checkpoint_00000025", logs), logs[-4000:]
    client = c.mlflow()
    runs = _runs(client, "sdofm-pretrain", f"attributes.run_name = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    run = runs[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [5, 10, 15, 20, 25], steps
    # The restart's own record: the controller's line, the worker's, and the run's tag all
    # name the checkpoint it went on from, one the job had written before the node was lost.
    restarts = re.findall(r"failed \(.*\); restart (\d+) of 3 from step (\d+)", logs)
    assert restarts, logs[-4000:]
    resumed = re.findall(r"resumed at step (\d+) \(epoch", logs)
    assert resumed and resumed[-1] == restarts[-1][1], (restarts, resumed)
    assert int(resumed[-1]) in (5, 10, 15, 20), resumed
    assert run.data.tags["sdofm.resumed_at_step"] == resumed[-1]

"""cluster/: every YAML checked offline against what it is for, and a local Ray head
driven the way a user drives a cluster: ``cluster/local/start_head.sh``, ``ray job submit
--working-dir .`` of ``ray_jobs/pretrain.py``, the MLflow run and checkpoint it leaves,
a second node for a 2-worker job across nodes, and a stop by pid that runs even when a
test fails. The head uses its own temp dir, token and free ports: it cannot meet the
test session's Ray instance or another head on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
LAUNCHER_YAMLS = [CLUSTER / "gcp.yaml", CLUSTER / "aws.yaml"]
K8S_YAMLS = sorted((CLUSTER / "k8s").glob("*.yaml"))
ALL_YAMLS = sorted(CLUSTER.rglob("*.yaml"))
SCRIPTS = sorted(CLUSTER.rglob("*.sh"))
IMAGE_ROOT = "/home/ray/sdofm/"  # where cluster/Dockerfile puts the repository


def pinned_ray_version() -> str:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    (pin,) = [m.group(1) for line in lines if (m := re.match(r"ray==([\w.]+)$", line))]
    return pin


RAY_VERSION = pinned_ray_version()


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------- static


def test_cluster_files_exist():
    for rel in [
        "README.md",
        "Dockerfile",
        "gcp.yaml",
        "aws.yaml",
        "local/start_head.sh",
        "local/stop_head.sh",
        "local/add_worker.sh",
        "k8s/raycluster.yaml",
        "k8s/rayjob-pretrain.yaml",
        "k8s/rayjob-tune.yaml",
    ]:
        assert (CLUSTER / rel).is_file(), rel
    assert (REPO / ".rayignore").is_file()
    assert RAY_VERSION == __import__("ray").__version__, "the venv's Ray is not the pinned one"


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses_and_pins_ray(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    text = path.read_text()
    # Every Ray version named anywhere (image tags, rayVersion, asserts) is the pinned one.
    named = set(re.findall(r"ray[:\-]?(\d+\.\d+\.\d+)", text)) | set(
        re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text)
    )
    assert named <= {RAY_VERSION}, named
    if any(d.get("kind") in ("RayCluster", "RayJob") or "provider" in d for d in docs):
        assert named == {RAY_VERSION}, "a cluster file names its Ray version"
    # No credentials in any file: identities come from service accounts, tokens from
    # files, passwords from secrets ($VARIABLES in examples).
    for pattern in (
        r"AKIA[0-9A-Z]{16}",
        r"-----BEGIN",
        r"private_key\"?\s*:",
        r"://[^/\s:@$]+:[^/\s@$]+@",
    ):
        assert not re.search(pattern, text), pattern


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_config_validates(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    validate_config(cfg)  # ray-schema.json, offline
    validate_config(prepare_config(cfg))  # merged with the provider's defaults, as `ray up` does

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = [t for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "a GPU worker type"
    for t in gpu_types:
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, "GPU workers autoscale from zero"
    assert f"ray{RAY_VERSION}" in cfg["docker"]["image"]
    assert any(f"'{RAY_VERSION}'" in c for c in cfg["setup_commands"]), "the image's Ray is checked"
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ray start" not in cmd or "RAY_AUTH_MODE=token" in cmd, cmd
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    # The token travels as a file from the submitting machine, never inline.
    assert any(p.endswith("auth_token") for p in cfg["file_mounts"])


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_every_key_commented(path):
    """Every mapping key carries a comment, on its line or on the comment line above."""
    lines = path.read_text().splitlines()
    key = re.compile(r"^\s*(?:- )?[\w./~-]+:(\s|$)")
    missing = []
    previous = ""
    for i, line in enumerate(lines, 1):
        if key.match(line) and "#" not in line and not previous.lstrip().startswith("#"):
            missing.append(f"{i}: {line.strip()}")
        if line.strip():
            previous = line
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in K8S_YAMLS for d in _docs(p)]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for path, doc in _k8s_docs():
        if doc["kind"] == "RayCluster":
            specs.append((f"{path.name}:{doc['metadata']['name']}", doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((f"{path.name}:{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]))
    return specs


def test_k8s_manifests_kinds():
    docs = _k8s_docs()
    kinds = [d["kind"] for _, d in docs]
    assert {"RayCluster", "RayJob", "ConfigMap", "PersistentVolumeClaim"} <= set(kinds)
    for path, d in docs:
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), path
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1", path
    jobs = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "RayJob"}
    scripts = {
        re.search(r"ray_jobs/(\w+)\.py", j["spec"]["entrypoint"]).group(1) for j in jobs.values()
    }
    assert {"pretrain", "tune"} <= scripts


@pytest.mark.parametrize("name,spec", _cluster_specs(), ids=[n for n, _ in _cluster_specs()])
def test_k8s_ray_cluster_spec(name, spec):
    docs = [d for _, d in _k8s_docs()]
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}

    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"

    def check_pod(template: dict, gpu: bool) -> None:
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["image"].endswith(f"-ray{RAY_VERSION}-gpu"), c["image"]
            req = c["resources"]["requests"]
            assert req.get("cpu") and req.get("memory"), c["name"]
            if gpu:
                assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
                assert req["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
            # The MLflow tracking URI comes from the environment (a ConfigMap).
            env_maps = [
                e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e
            ]
            assert any("MLFLOW_TRACKING_URI" in config_maps[m]["data"] for m in env_maps), c["name"]
            # Shared storage for checkpoints on every pod, backed by a claim in the manifests.
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "/mnt/shared" in mounts
            assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] in claims

    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    check_pod(head["template"], gpu=False)
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        check_pod(group["template"], gpu=True)


@pytest.mark.parametrize(
    "job",
    [d for _, d in _k8s_docs() if d["kind"] == "RayJob"],
    ids=lambda d: d["metadata"]["name"],
)
def test_k8s_rayjob_entrypoint(job):
    """The entrypoint runs a ray_jobs/ script from the image, with overrides the config accepts."""
    from sdofm.config import load_config

    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(IMAGE_ROOT + "ray_jobs/"), argv[:2]
    script = REPO / argv[1].removeprefix(IMAGE_ROOT)
    assert argv[2] == "--config" and argv[3].startswith(IMAGE_ROOT + "configs/")
    config = REPO / argv[3].removeprefix(IMAGE_ROOT)
    overrides = argv[4:]
    assert all("=" in o for o in overrides), overrides
    assert "data.cache_dir=/mnt/shared/cache" in overrides
    if "pretrain" in script.name:
        assert any(o.startswith("train.storage_path=/mnt/shared/") for o in overrides)
    assert script.is_file() and config.is_file(), (script, config)
    load_config(config, overrides)


def test_k8s_sweep_fits_the_backbone_of_the_pretraining_job():
    """The sweep's data gives the shipped pretraining job's backbone what it was trained on:
    the same channels, image size and frames, from the same archive and cache; and streams
    the real archive's splits rather than holding them in memory."""
    from sdofm.config import load_config

    jobs = {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "RayJob"}
    cfgs = {}
    for name in ("sdofm-pretrain", "sdofm-tune-dimming"):
        argv = shlex.split(jobs[name]["spec"]["entrypoint"])
        cfgs[name] = load_config(REPO / argv[3].removeprefix(IMAGE_ROOT), argv[4:])
    pre, tune = cfgs["sdofm-pretrain"], cfgs["sdofm-tune-dimming"]
    assert tune.data.channels == pre.data.channels and len(pre.data.channels) == 9
    assert tune.transform.size == pre.transform.size and tune.data.num_frames == pre.data.num_frames
    assert tune.data.model_dump() == pre.data.model_dump()  # root, stores, split, cache
    assert tune.transform.model_dump() == pre.transform.model_dump()
    assert tune.tracking.experiment == pre.tracking.experiment  # where the backbone is found
    assert tune.train.storage_path == pre.train.storage_path
    assert tune.finetune.head != "baseline_cnn" and tune.finetune.backbone is None
    # 20000 train samples of 9 x 512 x 512 float32 alone are ~190 GB: streamed, not held.
    sample_gb = len(tune.data.channels) * tune.data.num_frames * 512 * 512 * 4 / 1e9
    assert tune.finetune.max_train_samples * sample_gb > tune.finetune.materialize_max_gb


def test_dockerfile_base_image_pins_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases == [f"rayproject/ray:{RAY_VERSION}-py311-gpu"], bases
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    assert f"'{RAY_VERSION}'" in text, "the build checks the installed Ray"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_shell_script(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "set -euo pipefail" in path.read_text()
    assert os.access(path, os.X_OK), f"{path} is not executable"
    assert not re.search(r"^\s*[^#]*\bray stop\b", path.read_text(), re.M), (
        "never a global ray stop"
    )


def test_rayignore_keeps_data_out_of_the_upload(tmp_path):
    """What `ray job submit --working-dir .` would upload, with .rayignore alone (no .gitignore)."""
    from ray._private.runtime_env.packaging import create_package

    work = tmp_path / "work"
    for rel in [
        "sdofm/__init__.py",
        "ray_jobs/pretrain.py",
        "configs/pretrain/x.yaml",
        "data/synthetic/sdomlv2.zarr/.zgroup",
        "data/cache/index.parquet",
        "other.zarr/0.0",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/a",
        "ray_results/run/checkpoint_000000/model.pt",
        "results/x.json",
        ".venv/bin/python",
        "sdofm.egg-info/PKG-INFO",
    ]:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text("x")
    shutil.copy(REPO / ".rayignore", work / ".rayignore")
    create_package(str(work), tmp_path / "pkg.zip", include_gitignore=False)
    with zipfile.ZipFile(tmp_path / "pkg.zip") as z:
        files = {i.filename for i in z.infolist() if not i.is_dir()}
    assert files == {
        ".rayignore",
        "sdofm/__init__.py",
        "ray_jobs/pretrain.py",
        "configs/pretrain/x.yaml",
    }, files


# --------------------------------------------------------------------------- local head


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _read_env_sh(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(.*)$", path.read_text(), re.M))


class LocalHead:
    """A head started by cluster/local/start_head.sh; ``env`` reaches it (address + token)."""

    def __init__(self, root: Path):
        self.root = root
        self.env: dict[str, str] = {}

    def run(self, *args: str, timeout: float = 120, check: bool = True, **kw):
        return subprocess.run(
            list(args),
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **kw,
        )

    def submit(self, sid: str, entrypoint: list[str], env_vars: dict, timeout: float = 240):
        """``ray job submit`` from the repository root; returns (status, logs)."""
        cmd = [
            RAY, "job", "submit", "--submission-id", sid, "--working-dir", ".",
            "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entrypoint,
        ]  # fmt: skip
        try:
            out = self.run(*cmd, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            self.run(RAY, "job", "stop", sid, check=False)
            logs = self.run(RAY, "job", "logs", sid, check=False).stdout
            pytest.fail(f"job {sid} did not finish in {timeout} s; logs:\n{logs[-4000:]}")
        return self.job(sid)["status"], out.stdout + out.stderr

    def job(self, sid: str) -> dict:
        """The state API's record of submission ``sid`` (status, Ray job id, ...)."""
        jobs = json.loads(self.run(RAY, "list", "jobs", "--detail", "--format", "json").stdout)
        (job,) = [j for j in jobs if j.get("submission_id") == sid]
        return job


@pytest.fixture(scope="module")
def local_head():
    # A short temp dir: Ray's unix sockets live under it (107-byte path limit).
    root = Path(tempfile.mkdtemp(prefix="sdofm-ray-", dir="/tmp"))
    port, dashboard, client = _free_ports(3)
    head = LocalHead(root)
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH_TOKEN"))
    }
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    base["RAY_BIN"] = RAY
    try:
        subprocess.run(
            [
                str(CLUSTER / "local/start_head.sh"),
                *("--dir", str(root), "--port", str(port), "--dashboard-port", str(dashboard)),
                *("--client-port", str(client), "--num-cpus", "2"),
            ],
            env=base,
            check=True,
            timeout=150,
            capture_output=True,
            text=True,
        )
        head.env = {**base, **_read_env_sh(root / "env.sh")}
        assert head.env["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{dashboard}"
        yield head
    except subprocess.CalledProcessError as e:
        pytest.fail(f"start_head.sh failed:\n{e.stdout}\n{e.stderr}")
    finally:
        # By pid, whatever happened above; then nothing of this head may be left.
        pids = [int(p.read_text()) for p in root.glob("*.pid")]
        subprocess.run(
            [str(CLUSTER / "local/stop_head.sh"), "--dir", str(root), "--timeout", "30"],
            env=base,
            timeout=120,
        )
        for pid in pids:
            try:
                os.killpg(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            assert not alive, f"process group {pid} of the local head survived stop_head.sh"
        shutil.rmtree(root, ignore_errors=True)


def _job_entrypoint(synth_root: Path, work: Path, *overrides: str) -> list[str]:
    return [
        "python", "ray_jobs/pretrain.py", "--config", "configs/pretrain/mae_debug.yaml",
        f"data.root={synth_root}", f"data.cache_dir={work / 'cache'}",
        f"train.storage_path={work / 'ray_results'}", *overrides,
    ]  # fmt: skip


def _needs_pretrain() -> None:
    for rel in ("ray_jobs/pretrain.py", "configs/pretrain/mae_debug.yaml"):
        assert (REPO / rel).is_file(), rel


@pytest.mark.ray  # starts a Ray head with `ray start`
def test_local_head_rejects_clients_without_the_token(local_head):
    import urllib.error
    import urllib.request

    url = local_head.env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401
    token = Path(local_head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(req, timeout=10).status == 200


@pytest.mark.ray  # starts a Ray head with `ray start`
def test_submit_pretrain_to_local_head(local_head, synth_root, tmp_path):
    """`ray job submit --working-dir .` of the debug pretraining: SUCCEEDED, MLflow run, checkpoint."""
    _needs_pretrain()
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sid = f"sdofm-test-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    status, logs = local_head.submit(
        sid,
        _job_entrypoint(synth_root, tmp_path, "train.run_name=cluster-e2e"),
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert status == "SUCCEEDED", logs[-4000:]
    run_id = re.search(r"MLflow run id: (\w+)", logs).group(1)
    ckpt = Path(re.search(r"Checkpoint: (\S+)", logs).group(1))
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "cluster-e2e"
    assert ckpt.is_dir() and (tmp_path / "ray_results") in ckpt.parents, ckpt
    assert any(ckpt.iterdir())
    print(f"pretrain job via ray job submit: {time.perf_counter() - t0:.1f} s")


@pytest.mark.ray  # starts a Ray head with `ray start`
def test_two_nodes_one_worker_each(local_head, synth_root, tmp_path):
    """A second node joined to the head; a 2-worker job places one train worker on each."""
    _needs_pretrain()
    added = local_head.run(
        str(CLUSTER / "local/add_worker.sh"),
        *("--dir", str(local_head.root), "--name", "node2", "--num-cpus", "1"),
        timeout=150,
    )
    print(added.stdout)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sid = f"sdofm-test-{uuid.uuid4().hex[:8]}"
    status, logs = local_head.submit(
        sid,
        _job_entrypoint(
            synth_root,
            tmp_path,
            "train.run_name=cluster-2node",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.25",
            "scaling.placement_strategy=STRICT_SPREAD",
            # Placement is the point here, not the optimisation: a few steps.
            *("train.max_steps=6", "train.checkpoint_every=6", "train.val_every=6"),
            *("tracking.log_model=false", "tracking.system_metrics=false"),
        ),
        {"MLFLOW_TRACKING_URI": uri},
    )
    assert status == "SUCCEEDED", logs[-4000:]

    job_id = local_head.job(sid)["job_id"]
    actors = json.loads(
        local_head.run(
            RAY, "list", "actors", "--detail", "--format", "json", "--limit", "10000",
            "--filter", "class_name=RayTrainWorker",
        ).stdout
    )  # fmt: skip
    nodes = {a["node_id"] for a in actors if a["job_id"] == job_id}
    alive = json.loads(local_head.run(RAY, "list", "nodes", "--format", "json").stdout)
    assert len([n for n in alive if n["state"] == "ALIVE"]) == 2
    assert len(nodes) == 2, f"train workers on nodes {nodes}"
    print(f"2 train workers on nodes {sorted(n[:8] for n in nodes)}")

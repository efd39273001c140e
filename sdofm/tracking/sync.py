"""The offline record of a run and ``sdofm mlflow sync``.

While MLflow cannot be reached, a run keeps what it could not send in its tracking folder
(:func:`fallback_dir`): ``metrics.jsonl``, ``tags.json``, ``figures/`` and ``run.json``
(which run they belong to, and the status it ended with). :func:`sync` sends them to the
run once the server is back. Every file is rewritten whole and atomically: an object store
cannot append, and a reader (``sync``, a resumed run) never sees half a file.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from sdofm.storage import exists, join, open_url, write_atomic

LOCAL_METRICS = "metrics.jsonl"
LOCAL_TAGS = "tags.json"
LOCAL_RUN = "run.json"
LOCAL_FIGURES = "figures"
SUMMARY_PREFIX = "test/"
"""One-off scores (the test split, once at the end): logged at step 0, where MLflow draws a
single value as a bar, not as a one-dot curve at the last step."""


def fallback_dir(storage: str, run_name: str) -> str:
    """Where a run keeps its metrics and figures while MLflow cannot be reached: beside its
    checkpoints (a folder or URL that every node and ``sdofm mlflow sync`` can read)."""
    return join(storage, run_name, "tracking")


def _read_json(fs, path: str) -> dict:
    try:
        with fs.open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def write_json(folder: str, name: str, obj, storage_options: dict | None = None) -> None:
    """``obj`` as ``folder/name``, whole or not at all."""
    fs, root = open_url(folder, storage_options)
    write_atomic(fs, f"{root}/{name}", json.dumps(obj).encode())


def keep_tags(folder: str, tags: dict[str, str], storage_options: dict | None = None) -> None:
    """Add ``tags`` to those a run keeps in ``folder`` for ``sdofm mlflow sync``."""
    fs, root = open_url(folder, storage_options)
    kept = _read_json(fs, f"{root}/{LOCAL_TAGS}")
    write_json(folder, LOCAL_TAGS, {**kept, **tags}, storage_options)


def keep_for_sync(
    folder: str,
    uri: str,
    run_id: str,
    status: str | None = None,
    tags: dict[str, str] | None = None,
    storage_options: dict | None = None,
) -> None:
    """Record in a run's tracking folder what the driver could not tell MLflow (the final
    status, tags) for ``sdofm mlflow sync``."""
    fs, root = open_url(folder, storage_options)
    run = {"tracking_uri": uri, "run_id": run_id, **_read_json(fs, f"{root}/{LOCAL_RUN}")}
    if status:
        run["status"] = status
    write_json(folder, LOCAL_RUN, run, storage_options)
    if tags:
        keep_tags(folder, tags, storage_options)


def kept_locally(folder: str, storage_options: dict | None = None) -> bool:
    """Whether a run's rank 0 switched to local files (its folder holds ``run.json``)."""
    return exists(join(folder, LOCAL_RUN), storage_options)


def read_local_metrics(folder: str, storage_options: dict | None = None) -> list[dict]:
    """The records a run kept in ``folder`` while MLflow was unreachable."""
    fs, root = open_url(folder, storage_options)
    try:
        with fs.open(f"{root}/{LOCAL_METRICS}") as f:
            return [json.loads(x) for x in f.read().decode().splitlines() if x]
    except FileNotFoundError:
        return []


def write_local_metrics(folder: str, records: list[dict], storage_options: dict | None) -> None:
    """All the records a run keeps in ``folder`` (the file is rewritten whole)."""
    fs, root = open_url(folder, storage_options)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    write_atomic(fs, f"{root}/{LOCAL_METRICS}", data)


def send_records(client, run_id: str, records: list[dict]) -> None:
    """Log metric records (``{"step", "time", metric: value}``) in MLflow's batches of 1000;
    one-off scores (``test/...``) at step 0."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(
            k,
            float(v),
            int(r.get("time", now)),
            0 if k.startswith(SUMMARY_PREFIX) else int(r["step"]),
        )
        for r in records
        for k, v in r.items()
        if k != "time" and isinstance(v, int | float)
    ]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def sync(folder: str, storage_options: dict | None = None, uri: str | None = None) -> dict:
    """Send what a run kept in ``folder`` (its ``tracking`` folder) while MLflow was
    unreachable: the metrics of steps the run does not hold, the figures, the tags; then
    close the run with the status it ended with. -> what was sent."""
    from mlflow import MlflowClient

    fs, root = open_url(folder, storage_options)
    try:
        with fs.open(f"{root}/{LOCAL_RUN}") as f:
            run = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder} holds no {LOCAL_RUN}: not the tracking folder of a run that lost its "
            "MLflow server (<storage>/<run name>/tracking)"
        ) from None
    uri = uri or run["tracking_uri"]
    if not run.get("run_id"):
        raise ValueError(
            f"{folder}: the run never reached MLflow (no run id); nothing to merge into"
        )
    client = MlflowClient(uri)
    run_id = run["run_id"]
    done = {m.step for m in client.get_metric_history(run_id, "step")}
    records = [r for r in read_local_metrics(folder, storage_options) if r["step"] not in done]
    send_records(client, run_id, records)
    figures = 0
    fig_root = f"{root}/{LOCAL_FIGURES}"
    if fs.exists(fig_root):
        for path in fs.find(fig_root):
            rel = path[len(fig_root) + 1 :]
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / Path(rel).name
                fs.get(path, str(local))
                parent = str(Path(rel).parent)
                client.log_artifact(run_id, str(local), None if parent == "." else parent)
            figures += 1
    tags = _read_json(fs, f"{root}/{LOCAL_TAGS}")
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    status = run.get("status")
    if status:
        client.set_terminated(run_id, status=status)
    client.set_tag(run_id, "sdofm.synced_from", folder)
    fs.mv(f"{root}/{LOCAL_RUN}", f"{root}/{LOCAL_RUN}.synced")
    return {
        "run_id": run_id,
        "tracking_uri": uri,
        "metric_steps": len({r["step"] for r in records}),
        "figures": figures,
        "tags": len(tags),
        "status": status,
    }

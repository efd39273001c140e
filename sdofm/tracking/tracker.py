"""Logging from the rank-0 training worker into one MLflow run, with the run's tracking
folder as the fallback when the store goes away."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

from sdofm.console import say
from sdofm.storage import open_url, write_atomic
from sdofm.tracking.guard import bound_http_retries, guarded
from sdofm.tracking.sync import (
    LOCAL_FIGURES,
    LOCAL_RUN,
    keep_tags,
    read_local_metrics,
    send_records,
    write_json,
    write_local_metrics,
)


class Tracker:
    """Logging from one process (the rank-0 worker) into one MLflow run.

    ``run_id`` None, or any failure of the store, switches to files under ``fallback_dir``
    (a folder or URL, reached with ``storage_options``): ``metrics.jsonl``, ``tags.json``,
    ``figures/`` and ``run.json`` (which run they belong to), the input of
    ``sdofm mlflow sync``. The switch is announced once, on the driver's console.
    """

    def __init__(
        self,
        uri: str,
        run_id: str | None,
        fallback_dir: str | Path,
        storage_options: dict | None = None,
    ):
        self.uri, self.run_id = uri, run_id
        self.fallback_dir = str(fallback_dir)
        self.storage_options = storage_options or {}
        self.local = run_id is None
        """Whether what is logged goes to the tracking folder (for good)."""
        self._monitor = None
        self._local: list[dict] | None = None  # records kept locally (read back once)
        if not self.local:
            bound_http_retries()  # before the system-metrics thread starts

    def _fail(self, what: str, e: Exception) -> None:
        say(
            f"warning: MLflow ({self.uri}) failed while logging {what} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); from now on metrics and figures are kept in "
            f"{self.fallback_dir}: `sdofm mlflow sync {self.fallback_dir}` sends them to the run "
            "once the server is back"
        )
        self.local = True
        self._write_json(LOCAL_RUN, {"tracking_uri": self.uri, "run_id": self.run_id})
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()

    def _call(self, what: str, fn) -> bool:
        """``fn(client)`` -> whether MLflow took it (False once the run went local)."""
        if self.local:
            return False
        return guarded(
            self.uri,
            what,
            lambda c: fn(c) or True,
            default=False,
            on_error=lambda e: self._fail(what, e),
        )

    def _write_json(self, name: str, obj) -> None:
        write_json(self.fallback_dir, name, obj, self.storage_options)

    def _keep_locally(self, records: list[dict]) -> None:
        if self._local is None:
            self._local = read_local_metrics(self.fallback_dir, self.storage_options)
        self._local.extend(records)
        write_local_metrics(self.fallback_dir, self._local, self.storage_options)

    def logged_steps(self) -> set[int]:
        """Steps the run already holds (MLflow's ``step`` metric, or the local file)."""
        if not self.local:
            got: set[int] = set()
            if self._call(
                "metrics",
                lambda c: got.update(m.step for m in c.get_metric_history(self.run_id, "step")),
            ):
                return got
        return {r["step"] for r in read_local_metrics(self.fallback_dir, self.storage_options)}

    def log_records(self, records: list[dict], missing: bool = False) -> None:
        """``records``: ``{"step": s, "time": ms, metric: value, ...}``; ``missing``: only
        the steps the run does not hold yet."""
        if missing and records:
            done = self.logged_steps()
            records = [r for r in records if r["step"] not in done]
        if not records:
            return
        if not self._call("metrics", lambda c: send_records(c, self.run_id, records)):
            self._keep_locally(records)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_records([{"step": step, "time": int(time.time() * 1000), **metrics}])

    def log_figure(self, fig, artifact_file: str) -> None:
        if not self._call("a figure", lambda c: c.log_figure(self.run_id, fig, artifact_file)):
            fs, root = open_url(self.fallback_dir, self.storage_options)
            buf = io.BytesIO()
            fig.savefig(buf, dpi=100, format=Path(artifact_file).suffix[1:] or "png")
            write_atomic(fs, f"{root}/{LOCAL_FIGURES}/{artifact_file}", buf.getvalue())
        import matplotlib.pyplot as plt

        plt.close(fig)

    def set_tags(self, tags: dict[str, str]) -> None:
        def send(c):
            for k, v in tags.items():
                c.set_tag(self.run_id, k, v)

        if not self._call("tags", send):
            keep_tags(self.fallback_dir, tags, self.storage_options)

    def start_system_metrics(self) -> None:
        """CPU, memory (and GPU when present) sampled every 10 s into the run."""
        if self.local:
            return

        def start(_client) -> None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, tracking_uri=self.uri, resume_logging=True
            )
            self._monitor.start()

        def off(e: Exception) -> None:  # system metrics are a convenience
            warnings.warn(f"system metrics are off: {e}", stacklevel=4)

        guarded(self.uri, "start system metrics", start, on_error=off)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

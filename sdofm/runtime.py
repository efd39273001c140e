"""Process-level set-up shared by the CLI and ``ray_jobs/``: the Ray connection and where
Ray's own log lines go. The library itself never calls ``ray.init``."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import warnings
from pathlib import Path

LOG_DIR = "logs"
_PACKAGE = str(Path(__file__).resolve().parent) + os.sep
_log_file: Path | None = None


def log_file() -> Path | None:
    """The file Ray's, Tune's and MLflow's own log lines went to (None: shown live)."""
    return _log_file


def _route_logs(handler: logging.Handler) -> None:
    """Move every console handler of the loggers that exist now (Ray's, MLflow's) to ``handler``."""
    for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
        if not isinstance(logger, logging.Logger):
            continue
        for h in list(logger.handlers):
            if getattr(h, "stream", None) in (
                sys.stderr,
                sys.stdout,
                sys.__stderr__,
                sys.__stdout__,
            ):
                logger.removeHandler(h)
                logger.addHandler(handler)
    if handler not in logging.root.handlers:
        logging.root.addHandler(handler)


def _to_file(path: Path) -> logging.Handler:
    """Send the log lines of Ray, Ray Data/Train/Tune and other libraries (MLflow, alembic)
    and their Python warnings to ``path``; sdofm's own warnings stay on the console."""
    global _log_file
    path.parent.mkdir(parents=True, exist_ok=True)
    _log_file = path
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _route_logs(handler)
    logging.root.setLevel(logging.INFO)
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(_PACKAGE):
            show(message, category, filename, lineno, file, line)
        else:
            handler.stream.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = showwarning
    return handler


def _raylet_messages_to(handler: logging.Handler) -> None:
    """Raylet warnings (e.g. "N PYTHON worker processes have been started", common with the
    fractional-CPU workers sdofm uses on small machines) reach the driver through a private
    printer that ignores ``log_to_driver``: keep them in the log file, except those about
    memory (an OOM kill is worth seeing live)."""
    from ray._private import worker

    printer = worker.print_to_stdstream

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") == "raylet" and not any(
            "memory" in line.lower() for line in data.get("lines", [])
        ):
            for line in data.get("lines", []):
                handler.emit(logging.LogRecord("raylet", logging.WARNING, "", 0, line, None, None))
            return
        printer(data, ignore_prefix)

    worker.print_to_stdstream = print_to_stdstream


def init_ray(num_cpus: int | None = None, verbose: bool = True, dashboard: bool = False) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray instance (once per process).

    Ray 2.60 keeps token authentication on; a client of a secured cluster needs the
    cluster's token (``RAY_AUTH_TOKEN``) in its environment. ``verbose`` shows the workers'
    output and Ray's log lines live (as a ``ray job``'s log wants); otherwise (the CLI's
    quiet console) they go to Ray's session logs and
    ``logs/sdofm-<time>.log`` (:func:`log_file`), and the training workers' progress lines
    reach this process through :mod:`sdofm.engine.progress`. ``dashboard`` starts the
    local instance's dashboard on 127.0.0.1:8265 (Ray Train's state checks need it too).
    """
    import ray
    import ray.data
    import ray.train
    import ray.tune  # noqa: F401 - imported so that its loggers exist before they are routed

    if ray.is_initialized():
        return
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-operator lines
    handler = None
    if not verbose:
        # MLflow would otherwise add its own console handler on import; Tune's new output
        # engine prints an experiment heading and a TensorBoard hint even at verbose=0.
        os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        handler = _to_file(Path(LOG_DIR).resolve() / f"sdofm-{stamp}-{os.getpid()}.log")
        _raylet_messages_to(handler)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        ctx = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=verbose)
        if dashboard and ctx.dashboard_url:
            print(f"Ray dashboard: http://{ctx.dashboard_url}", flush=True)
    if handler is not None:
        from sdofm.engine import progress

        progress.start_relay()
        _route_logs(handler)  # the loggers Ray set up while starting

"""Process-level set-up shared by the CLI and ``ray_jobs/``: the Ray connection. The library
itself never calls ``ray.init``; where the log lines go is :mod:`sdofm.console`'s."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from sdofm import console

LOG_DIR = "logs"
QUIET_ENV = {"MLFLOW_CONFIGURE_LOGGING": "false", "RAY_AIR_NEW_OUTPUT": "0"}
"""Set (unless the user set them) before a quiet console's Ray starts: MLflow would
otherwise add its own console handler when imported, and Tune's new output engine prints
an experiment heading and a TensorBoard hint even at verbose=0. Both libraries read them
from the environment only, once, and the local Ray instance's workers inherit them; no
thread of sdofm's or MLflow's is running yet."""


def init_ray(num_cpus: int | None = None, verbose: bool = True, dashboard: bool = False) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray instance (once per process).

    Ray 2.60 keeps token authentication on; a client of a secured cluster needs the
    cluster's token (``RAY_AUTH_TOKEN``) in its environment. ``verbose`` shows the workers'
    output and Ray's log lines live (as a ``ray job``'s log wants); otherwise (the CLI's
    quiet console) they go to Ray's session logs and ``logs/sdofm-<time>.log``
    (:func:`sdofm.console.log_file`), and the training workers' progress lines reach this
    process through :func:`sdofm.console.start_relay`. ``dashboard`` starts the local
    instance's dashboard on 127.0.0.1:8265 (Ray Train's state checks need it too).
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
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        handler = console.to_file(Path(LOG_DIR).resolve() / f"sdofm-{stamp}-{os.getpid()}.log")
        console.raylet_lines_to(handler)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        ctx = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=verbose)
        if dashboard and ctx.dashboard_url:
            print(f"Ray dashboard: http://{ctx.dashboard_url}", flush=True)
    if handler is not None:
        console.start_relay()
        console.route_logs(handler)  # the loggers Ray set up while starting

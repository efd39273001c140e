"""Process-level set-up shared by the CLI and ``ray_jobs/``: the Ray connection."""

from __future__ import annotations

import os


def init_ray(
    num_cpus: int | None = None, log_to_driver: bool = False, dashboard: bool = False
) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray instance (once per process).

    Ray 2.60 keeps token authentication on; a client of a secured cluster needs the
    cluster's token (``RAY_AUTH_TOKEN``) in its environment. ``log_to_driver`` shows
    the workers' output (training progress) in this process; Ray Data's progress bars
    are turned off then, they would drown it. ``dashboard`` starts the local
    instance's dashboard on 127.0.0.1:8265 (Ray Train's state checks need it too).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if log_to_driver:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ctx = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=log_to_driver)
        if dashboard and ctx.dashboard_url:
            print(f"Ray dashboard: http://{ctx.dashboard_url}", flush=True)

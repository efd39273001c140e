"""Process-level set-up shared by the CLI and ``ray_jobs/``: the Ray connection."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray instance (once per process).

    Ray 2.60 keeps token authentication on; a client of a secured cluster needs the
    cluster's token (``RAY_AUTH_TOKEN``) in its environment.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)

"""Shared fixtures: one small synthetic SDOML archive per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdofm.archive.synthetic import write_synthetic
from sdofm.config import load_config

# Small and fast: 32 px, a leap second (2012-06-30) inside HMI's TAI times, and
# one day each of November and December for the month split.
SMALL = [
    "synth.resolution=32",
    "synth.periods=[{start: 2012-06-29, days: 3}, {start: 2012-11-01, days: 1}, {start: 2012-12-01, days: 1}]",
    "synth.frames_per_chunk=8",
    "synth.missing_fraction=0.03",
    "synth.gaps_per_day=1.0",
    "synth.flares_per_day=4",
]


def small_config(root: Path | str, *extra: str):
    return load_config(None, [*SMALL, f"data.root={root}", *extra])


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A synthetic archive written once per session. Read-only: copy it to modify it."""
    root = tmp_path_factory.mktemp("sdoml") / "synthetic"
    cfg = small_config(root)
    write_synthetic(cfg.synth, cfg.data.root, cfg.data.storage_options)
    return root


@pytest.fixture
def synth_copy(synth_root, tmp_path) -> Path:
    """A private copy of the session archive that a test may damage."""
    dst = tmp_path / "synthetic"
    shutil.copytree(synth_root, dst)
    return dst


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (ray.init costs ~10 s here)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


NO_RAY_HERE = "127.0.0.1:9"
"""Where a test without the ``ray`` marker finds "its" Ray cluster: a port that refuses."""


@pytest.fixture(autouse=True)
def _ray_needs_its_marker(request, monkeypatch):
    """A test without the ``ray`` marker that starts Ray fails: ``ray.init`` raises in this
    process, and in a subprocess ``ray.init()`` and ``sdofm``'s start follow
    ``RAY_ADDRESS`` to a closed port. (In a run of both tiers a Ray instance that a marked test
    started may still be up; ``make test`` runs the unmarked tier first, on its own.)"""
    if request.node.get_closest_marker("ray") is None:
        import ray

        def refuse(*args, **kwargs):
            raise RuntimeError(f"{request.node.nodeid} starts Ray without the `ray` marker")

        monkeypatch.setattr(ray, "init", refuse)
        monkeypatch.setenv("RAY_ADDRESS", NO_RAY_HERE)  # subprocesses fail (after a wait)
    yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `ray` every test that uses `ray_session`, directly or through another fixture.

    Tests that reach Ray another way (a subprocess, ``init_ray``) carry the mark themselves.
    """
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for the whole session, stopped by pid at the end."""
    from tests.s3 import MotoServer

    server = MotoServer(log=tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3_proxy(s3_server):
    """A counting (and, on request, failing) proxy in front of the session's S3 server."""
    from tests.s3 import Proxy

    proxy = Proxy(s3_server.url).start()
    yield proxy
    proxy.stop()

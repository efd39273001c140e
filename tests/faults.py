"""Fault injection for the restart tests: an objective that wraps the real one and fails
once per run after a given step. It lives here, not in the training step: the product
knows nothing of it.

    fail_at(monkeypatch, step=11, how="kill")
    pretrain(cfg)
"""

from __future__ import annotations

import os
import signal
import sys

import cloudpickle


class FailAt:
    """``objective`` as it is, except that rank 0 fails once per run once ``step``
    optimiser steps are done: ``raise`` an error, or ``kill`` its process with SIGKILL (a
    lost worker). A marker under ``marker_url`` records that the run failed already, so the
    restarted attempt goes on."""

    def __init__(self, objective, step: int, how: str, marker_url: str, options: dict):
        self.inner, self.step, self.how = objective, step, how
        self.marker_url, self.options = marker_url, dict(options)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)  # unpickling asks before ``inner`` exists
        return getattr(self.inner, name)

    def after_step(self, model, info) -> None:
        import fsspec
        import torch.distributed as dist

        self.inner.after_step(model, info)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if info.step + 1 != self.step or rank != 0:
            return
        fs, marker = fsspec.core.url_to_fs(self.marker_url, **self.options)
        if fs.exists(marker):  # once per run, whichever attempt gets here first
            return
        fs.makedirs(marker.rsplit("/", 1)[0], exist_ok=True)
        fs.touch(marker)
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {self.step}")


def fail_at(monkeypatch, step: int, how: str = "raise") -> None:
    """Make every pretraining objective of this test a :class:`FailAt` (its marker in the
    run's storage folder)."""
    import sdofm.pretraining.run as run

    # The workers cannot import ``tests``: the wrapper travels by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    make = run.make_objective

    def failing(cfg, *args, **kwargs):
        from sdofm.engine import storage_path

        tc = cfg.train
        marker = f"{storage_path(tc.storage_path).rstrip('/')}/{tc.run_name}/injected_failure"
        return FailAt(make(cfg, *args, **kwargs), step, how, marker, tc.storage_options)

    monkeypatch.setattr(run, "make_objective", failing)


class CallAt:
    """``objective`` as it is, except that rank 0 calls ``action()`` once, right after
    optimiser step ``step`` (counted from 1): an event at an exact point of the run, not at
    a moment that a fast run may already have passed."""

    def __init__(self, objective, step: int, action):
        self.inner, self.step, self.action, self.done = objective, step, action, False

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def after_step(self, model, info) -> None:
        import torch.distributed as dist

        self.inner.after_step(model, info)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if info.step + 1 == self.step and rank == 0 and not self.done:
            self.done = True
            self.action()


def call_at(monkeypatch, step: int, action) -> None:
    """Make every pretraining objective of this test a :class:`CallAt` (``action`` travels
    to the worker by value)."""
    import sdofm.pretraining.run as run

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    make = run.make_objective
    monkeypatch.setattr(run, "make_objective", lambda *a, **k: CallAt(make(*a, **k), step, action))


def kill_server(pid: int, port: int) -> None:
    """SIGKILL a server's process group (no goodbye); return once its port on 127.0.0.1
    refuses connections."""
    import socket
    import time

    os.killpg(pid, signal.SIGKILL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
        except OSError:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the server on port {port} still answers")

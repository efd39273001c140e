"""Progress lines from the training workers, shown by the driver.

With ``log_to_driver`` off (the quiet console), Ray keeps the workers' output in its
session logs; ``start_relay`` (called by ``sdofm.runtime.init_ray``) starts a named actor
that collects the lines workers ``say`` and a driver thread that prints them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

RELAY_NAME = "sdofm-progress"
_relay = None  # this process's handle: None = not looked up yet, False = no relay
_driver = None  # in the driver: the relay actor
_lock = threading.Lock()


def _print(line: str) -> None:
    print(line, file=sys.__stdout__, flush=True)


def start_relay() -> None:
    """In the driver: collect workers' progress lines and print them as they come."""
    global _driver
    import ray

    @ray.remote(num_cpus=0)
    class Relay:
        def __init__(self):
            self.lines: list[str] = []

        def put(self, line: str) -> None:
            self.lines.append(line)

        def take(self) -> list[str]:
            out, self.lines = self.lines, []
            return out

    _driver = Relay.options(name=RELAY_NAME, get_if_exists=True).remote()

    def pump() -> None:
        while flush():
            time.sleep(0.3)

    threading.Thread(target=pump, name="sdofm-progress", daemon=True).start()


def flush() -> bool:
    """In the driver: print the lines the relay holds now (False once Ray has shut down)."""
    if _driver is None:
        return False
    import ray

    with _lock:
        try:
            lines = ray.get(_driver.take.remote())
        except Exception:  # noqa: BLE001 - Ray shut down: nothing more will come
            return False
        for line in lines:
            _print(line)
    return True


def say(message: str) -> None:
    """A progress line: printed by the driver (through the relay when there is one)."""
    global _relay
    line = f"[sdofm] {message}"
    if _relay is None and _driver is None:
        try:
            import ray

            _relay = ray.get_actor(RELAY_NAME) if ray.is_initialized() else False
        except ValueError:
            _relay = False
    if _relay and _driver is None:
        _relay.put.remote(line)
    else:
        _print(line)  # on the real stdout: Ray Train's print patch would log it twice


class _QuietReports(logging.Filter):
    """Drops Ray Train's per-report INFO line (it repeats every metric of every rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Reporting training result")


def quiet_reports() -> None:
    """Install :class:`_QuietReports` on this worker's log handlers."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietReports())

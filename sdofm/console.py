"""What the user sees while a job runs: sdofm's progress lines, and where everything else
goes.

``say`` prints a progress line. With Ray's ``log_to_driver`` off (the CLI's quiet
console) the training workers' output stays in Ray's session logs, so ``start_relay``
starts a named actor that collects the lines workers ``say`` and a driver thread that
prints them. ``to_file`` sends Ray's, Tune's and MLflow's own log lines, and the Python
warnings of every library but sdofm, to a log file (:func:`log_file`).

At the bottom of the package: imports nothing of sdofm, and Ray only inside functions.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

RELAY_NAME = "sdofm-progress"
_relay = None  # this process's handle: None = not looked up yet, False = no relay
_driver = None  # in the driver: the relay actor
_lock = threading.Lock()
_log_file: Path | None = None
_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


# --------------------------------------------------------------------------- progress lines


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


# --------------------------------------------------------------------------- the log file


def log_file() -> Path | None:
    """The file Ray's, Tune's and MLflow's own log lines went to (None: shown live)."""
    return _log_file


class _OwnWarnings(logging.StreamHandler):
    """sdofm's own warnings, on the console while everything else goes to the log file."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.setFormatter(_WarningText())
        self.addFilter(from_sdofm)


class _WarningText(logging.Formatter):
    """A captured warning as ``warnings`` prints it (its text ends in a newline already)."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage().rstrip("\n")


def from_sdofm(record: logging.LogRecord) -> bool:
    """Whether a captured warning was raised in sdofm's code (its text starts with the file
    it came from)."""
    text = str(record.getMessage())
    path = text.split(":", 1)[0]
    return path.startswith(_PACKAGE) or str(Path(path).resolve()).startswith(_PACKAGE)


def route_logs(handler: logging.Handler) -> None:
    """Move every console handler of the loggers that exist now (Ray's, MLflow's) to
    ``handler``; the root logger gets it too."""
    for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
        if not isinstance(logger, logging.Logger):
            continue
        for h in list(logger.handlers):
            if isinstance(h, _OwnWarnings):
                continue
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


def to_file(path: Path) -> logging.Handler:
    """Send the log lines of Ray, Ray Data/Train/Tune and other libraries (MLflow, alembic)
    and their Python warnings to ``path``; sdofm's own warnings stay on the console.

    Warnings reach the log through :func:`logging.captureWarnings`, the standard library's
    own route from ``warnings`` to ``logging`` (sdofm's are in the file too)."""
    global _log_file
    path.parent.mkdir(parents=True, exist_ok=True)
    _log_file = path
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    route_logs(handler)
    logging.root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    captured = logging.getLogger("py.warnings")  # propagates to the file
    if not any(isinstance(h, _OwnWarnings) for h in captured.handlers):
        captured.addHandler(_OwnWarnings())
    return handler


def raylet_lines_to(handler: logging.Handler) -> None:
    """Keep the raylet's warnings (e.g. "N PYTHON worker processes have been started",
    common with the fractional-CPU workers sdofm uses on small machines) in the log file,
    except those about memory (an OOM kill is worth seeing live).

    The one patch of a private API in sdofm: Ray's driver prints these through
    ``ray._private.worker.print_to_stdstream`` whatever ``log_to_driver`` says, and has no
    public setting or logger for them. ``tests/test_console.py`` fails when that function
    or the call that prints them changes.
    """
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

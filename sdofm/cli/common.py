"""What the command groups share: the console, the Ray start, config loading from the
command line's arguments, error and progress display."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sdofm.console import log_file

console = Console(width=None if Console().is_terminal else 140)
_verbose = False


def set_verbose(verbose: bool) -> None:
    """The top-level --verbose, read by every Ray start of this process."""
    global _verbose
    _verbose = verbose


def start_ray(dashboard: bool = False) -> None:
    """Ray for this command (``RAY_ADDRESS`` or a local instance); Ray's own log lines go to
    a file unless --verbose."""
    from sdofm.runtime import init_ray

    init_ray(verbose=_verbose, dashboard=dashboard)


def where_logs() -> None:
    if log_file() is not None:
        console.print(
            f"Ray, Tune and MLflow log lines: {log_file()} (workers' output: Ray's session logs, "
            "/tmp/ray/session_latest/logs; --verbose shows them live)",
            highlight=False,
        )


Args = Annotated[
    list[str] | None,
    typer.Argument(
        help="An optional YAML config, then dotted overrides such as data.cadence=24min "
        "(default: the built-in defaults, i.e. configs/data/synthetic.yaml).",
        show_default=False,
    ),
]


def load_args(args: list[str] | None):
    from sdofm.config import load_config

    args = list(args or [])
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise typer.BadParameter(f"one config file at most, got {paths}")
    return load_config(paths[0] if paths else None, [a for a in args if "=" in a])


@contextmanager
def friendly_errors():
    """Known failures print one clear message and exit 2; anything else keeps its traceback."""
    from sdofm.config import ConfigError
    from sdofm.datasets.sdoml import SDOMLError

    try:
        yield
    except (ConfigError, SDOMLError) as e:
        # One line however long: a wrapped URL cannot be copied.
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def progress(description: str):
    """A rich progress bar, shown from the first ``update(done, total)`` on (work that turns
    out to have nothing to do shows none)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=None)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def print_skipped(headline: str, rows: list[dict], limit: int = 20) -> None:
    """The unusable frames a run skipped (store, year, channel, frame, reason), each once."""
    if not rows:
        return
    console.print(f"[bold yellow]warning:[/] {headline}", highlight=False)
    table = Table("store", "year", "channel", "frame", "reason", title="skipped frames")
    for r in rows[:limit]:
        table.add_row(r["store"], str(r["year"]), r["channel"], str(r["frame"]), r["reason"])
    console.print(table)
    if len(rows) > limit:
        console.print(f"  ... and {len(rows) - limit:,} more", highlight=False)


def print_run_skipped(report, run_id: str | None) -> None:
    if report:
        where = f"; the list is in MLflow run {run_id}'s skipped_frames.json" if run_id else ""
        print_skipped(report.summary() + where, report.rows())

"""The ``sdofm`` command line. Commands only parse arguments and call the package.

Heavy libraries (numpy, zarr, ray, torch, mlflow) are imported inside commands so
that ``sdofm --help`` answers at once.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="sdofm: foundation models of the Sun on SDO data (SDOML v2), with Ray and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(
    help="SDOML stores: write the synthetic Sun, inspect stores, build the alignment index.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
console = Console(width=None if Console().is_terminal else 140)

Args = Annotated[
    list[str] | None,
    typer.Argument(
        help="An optional YAML config, then dotted overrides such as data.cadence=24min "
        "(default: the built-in defaults, i.e. configs/data/synthetic.yaml).",
        show_default=False,
    ),
]


def _load(args: list[str] | None):
    from sdofm.config import load_config

    args = list(args or [])
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise typer.BadParameter(f"one config file at most, got {paths}")
    return load_config(paths[0] if paths else None, [a for a in args if "=" in a])


@contextmanager
def _friendly_errors():
    """Known failures print one clear message and exit 2; anything else keeps its traceback."""
    from sdofm.config import ConfigError
    from sdofm.datasets.sdoml import SDOMLError

    try:
        yield
    except (ConfigError, SDOMLError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def _progress(description: str):
    """A rich progress bar; yields ``update(done, total)``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _du(url: str, storage_options: dict) -> int:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return int(fs.du(path)) if fs.exists(path) else 0


# --------------------------------------------------------------------------- data


def run_synth(cfg) -> None:
    from sdofm.datasets.synthetic import write_synthetic

    t0 = time.perf_counter()
    with _progress(f"synthetic Sun -> {cfg.data.root}") as update:
        report = write_synthetic(cfg, progress=update)
    if report.reused:
        console.print(f"synthetic stores in {cfg.data.root} already match these settings: reused")
        return
    size = _du(cfg.data.root, cfg.data.storage_options)
    frames = sum(report.frames.values())
    console.print(
        f"wrote {frames:,} frames ({cfg.synth.resolution} px) and {report.eve_rows:,} EVE rows to "
        f"{cfg.data.root}: {size / 2**20:,.1f} MiB in {time.perf_counter() - t0:,.1f} s"
    )


def run_index(cfg, rebuild: bool = False) -> None:
    from sdofm.datasets.index import load_or_build_index

    t0 = time.perf_counter()
    with _progress("reading headers") as update:
        _, report = load_or_build_index(cfg.data, rebuild=rebuild, progress=update)
    verb = "reused" if report.reused else "built"
    console.print(
        f"{verb} index {report.path}: {report.n_rows:,} aligned steps of {report.n_grid:,} on the "
        f"{cfg.data.cadence.total_seconds() / 60:g}-min grid (train {report.splits['train']:,}, "
        f"val {report.splits['val']:,}, test {report.splits['test']:,}) in {time.perf_counter() - t0:.1f} s"
    )
    if report.dropped:
        table = Table("dropped steps: reason", "steps", title=None)
        for reason, n in sorted(report.dropped.items(), key=lambda kv: -kv[1]):
            table.add_row(reason, f"{n:,}")
        console.print(table)
    for c, reasons in report.bad_headers.items():
        console.print(
            f"[yellow]skipped frames of {c}:[/] "
            + ", ".join(f"{r}: {n}" for r, n in reasons.items())
        )
    for line in report.examples[:5]:
        console.print(f"  e.g. {line}", highlight=False)


def run_info(cfg, as_json: bool = False) -> None:
    from sdofm.constants import AIA_CHANNELS, HMI_CHANNELS
    from sdofm.datasets.sdoml import Archive, describe

    archive = Archive.open(cfg.data, require=["aia"] if cfg.data.aia_channels else ["hmi"])
    summary = describe(archive)
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    for name in ("aia", "hmi"):
        if name not in summary:
            continue
        s = summary[name]
        first = next(iter(next(iter(s["years"].values())).values()))
        console.print(
            f"[bold]{s['instrument']}[/] {s['url']}  years {', '.join(s['years'])}  frames {first['shape']} "
            f"{first['dtype']}, chunks {first['chunks']}, {first['codec']}"
        )
        table = Table(
            "year",
            "channel",
            "frames",
            "first (UTC)",
            "last (UTC)",
            "cadence",
            "gaps",
            "longest gap",
            "bad headers",
            "time-ordered",
        )
        known = list(AIA_CHANNELS + HMI_CHANNELS)
        for year, rows in s["years"].items():
            for c, r in sorted(
                rows.items(), key=lambda kv: known.index(kv[0]) if kv[0] in known else 99
            ):
                table.add_row(
                    year,
                    c,
                    f"{r['frames']:,}",
                    r["first"].replace("T", " ")[:16],
                    r["last"].replace("T", " ")[:16],
                    f"{r['cadence_s'] / 60:g} min",
                    str(r["gaps"]),
                    f"{r['longest_gap_s'] / 3600:.1f} h",
                    str(r["bad_headers"]),
                    "yes" if r["in_time_order"] else "no (days shuffled)",
                )
        console.print(table)
    if "eve" in summary:
        e = summary["eve"]
        console.print(
            f"[bold]EVE[/] {e['url']}  {e['lines']} MEGS-A lines, {e['rows']:,} rows, {e['first']} .. {e['last']}"
        )


def run_stats(cfg, recompute: bool = False) -> None:
    from sdofm.datasets.index import load_or_build_index
    from sdofm.datasets.stats import load_or_compute_stats
    from sdofm.runtime import init_ray

    table, _ = load_or_build_index(cfg.data)
    init_ray()
    t0 = time.perf_counter()
    with console.status("normalisation statistics over the train split (Ray Data)"):
        stats = load_or_compute_stats(cfg, table, recompute=recompute)
    console.print(
        f"statistics of {stats['samples']:,} train samples in {time.perf_counter() - t0:.1f} s: {stats['path']}"
    )
    table_ = Table(
        "channel", "mean", "std", "min", "p0.5", "p50", "p99.5", "max", title="scaled values"
    )
    for c, s in stats["channels"].items():
        p = s["percentiles"]
        table_.add_row(
            c,
            *(
                f"{v:.3g}"
                for v in (s["mean"], s["std"], s["min"], p["0.5"], p["50"], p["99.5"], s["max"])
            ),
        )
    console.print(table_)


@data_app.command("synth")
def data_synth(args: Args = None) -> None:
    """Write the synthetic Sun (AIA, HMI, EVE in the SDOML v2 layout + truth) to data.root."""
    with _friendly_errors():
        run_synth(_load(args))


@data_app.command("index")
def data_index(
    args: Args = None,
    rebuild: Annotated[bool, typer.Option(help="Rebuild even if current.")] = False,
) -> None:
    """Build (or reuse) the alignment index of data.root's stores."""
    with _friendly_errors():
        run_index(_load(args), rebuild)


@data_app.command("stats")
def data_stats(
    args: Args = None,
    recompute: Annotated[bool, typer.Option(help="Recompute even if current.")] = False,
) -> None:
    """Per-channel normalisation statistics of the train split, computed with Ray Data."""
    with _friendly_errors():
        run_stats(_load(args), recompute)


@data_app.command("info")
def data_info(
    args: Args = None, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """What the stores hold: years, channels, frame counts, time span, gaps, chunking, codec."""
    with _friendly_errors():
        run_info(_load(args), as_json)


@app.command("demo")
def demo(args: Args = None) -> None:
    """The main job on the embedded default: synthetic Sun -> alignment index -> statistics -> summary."""
    with _friendly_errors():
        cfg = _load(args)
        run_synth(cfg)
        run_index(cfg)
        run_info(cfg)
        run_stats(cfg)


if __name__ == "__main__":
    app()

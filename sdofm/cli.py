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

from sdofm.constants import AIA_CHANNELS, HMI_CHANNELS

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
_verbose = False


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Show Ray's, Tune's and the workers' own log lines live."
        ),
    ] = False,
) -> None:
    """sdofm: foundation models of the Sun on SDO data (SDOML v2), with Ray and MLflow."""
    global _verbose
    _verbose = verbose


def _start_ray(dashboard: bool = False) -> None:
    """Ray for this command (``RAY_ADDRESS`` or a local instance); Ray's own log lines go to
    a file unless --verbose."""
    from sdofm.runtime import init_ray

    init_ray(verbose=_verbose, dashboard=dashboard)


def _where_logs() -> None:
    from sdofm.runtime import log_file

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
        # One line however long: a wrapped URL cannot be copied.
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def _progress(description: str):
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


def _du(url: str, storage_options: dict) -> int:
    from sdofm.storage import open_url

    fs, path = open_url(url, storage_options)
    return int(fs.du(path)) if fs.exists(path) else 0


# --------------------------------------------------------------------------- data


def run_synth(cfg) -> None:
    from sdofm.archive.synthetic import write_synthetic

    t0 = time.perf_counter()
    with _progress(f"synthetic Sun -> {cfg.data.root}") as update:
        report = write_synthetic(
            cfg.synth, cfg.data.root, cfg.data.storage_options, progress=update
        )
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
        reasons = sorted(report.dropped.items(), key=lambda kv: -kv[1])
        console.print("dropped steps: " + ", ".join(f"{r} {n:,}" for r, n in reasons))
    for c, reasons in report.bad_headers.items():
        console.print(
            f"[yellow]skipped frames of {c}:[/] "
            + ", ".join(f"{r}: {n}" for r, n in reasons.items())
        )
    for line in report.examples[:5]:
        console.print(f"  e.g. {line}", highlight=False)


def run_info(cfg, as_json: bool = False) -> None:
    from sdofm.datasets.sdoml import Archive, describe

    archive = Archive.open(cfg.data, require=["aia"] if cfg.data.aia_channels else ["hmi"])
    summary = describe(archive, cfg.data.start, cfg.data.end)
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


def run_ingest(
    source: str,
    out: str,
    instrument: str,
    size: int | None = None,
    frames_per_chunk: int | None = None,
    channel: str | None = None,
    deg_cor: list[str] | None = None,
) -> None:
    from sdofm.archive.ingest import ingest

    factors = {}
    for item in deg_cor or []:
        name, _, value = item.partition("=")
        try:
            factors[name.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(
                f"--deg-cor {item!r}: write CHANNEL=FACTOR, e.g. 171A=0.85"
            ) from None
    _start_ray()
    with _progress(f"ingest {instrument.upper()} FITS -> {out}") as update:
        report = ingest(
            source,
            out,
            instrument,
            size=size,
            frames_per_chunk=frames_per_chunk,
            channel=channel,
            deg_cor=factors,
            progress=update,
        )
    per_channel = ", ".join(f"{c}: {n:,}" for c, n in sorted(report.ingested.items()))
    console.print(
        f"ingested {report.n_ingested:,} frames{f' ({per_channel})' if per_channel else ''} of "
        f"{report.files:,} files into {report.store} in {report.seconds:.1f} s "
        f"({report.frames_per_s:.1f} frames/s); {len(report.already):,} already there, "
        f"{len(report.skipped):,} skipped",
        highlight=False,
    )
    if report.dropped_uncommitted:
        console.print(
            f"[yellow]removed {report.dropped_uncommitted:,} uncommitted frame(s) "
            "of an interrupted run first[/]"
        )
    if report.skipped:
        table = Table("skipped file", "reason")
        for path, reason in report.skipped[:50]:
            table.add_row(path, reason)
        console.print(table)
        if len(report.skipped) > 50:
            console.print(f"  ... and {len(report.skipped) - 50:,} more")


def _print_skipped(headline: str, rows: list[dict], limit: int = 20) -> None:
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


def _print_run_skipped(report, run_id: str | None) -> None:
    if report:
        where = f"; the list is in MLflow run {run_id}'s skipped_frames.json" if run_id else ""
        _print_skipped(report.summary() + where, report.rows())


def run_stats(cfg, recompute: bool = False) -> None:
    from sdofm.datasets.index import load_or_build_index
    from sdofm.datasets.stats import load_or_compute_stats

    table, _ = load_or_build_index(cfg.data)
    _start_ray()
    t0 = time.perf_counter()
    with console.status("normalisation statistics over the train split (Ray Data)"):
        stats = load_or_compute_stats(
            cfg.data, cfg.transform, cfg.loader, table, recompute=recompute
        )
    console.print(
        f"statistics of {stats['samples']:,} train samples in {time.perf_counter() - t0:.1f} s: {stats['path']}"
    )
    skipped = stats.get("skipped") or {}
    _print_skipped(
        f"{len(skipped.get('frames', [])):,} unusable frame(s) skipped; {skipped.get('samples', 0):,} "
        "train sample(s) left out of the statistics",
        skipped.get("frames", []),
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


@data_app.command("replica")
def data_replica(
    out: Annotated[
        str, typer.Argument(help="Folder or fsspec URL to write to.", show_default=False)
    ],
    years: Annotated[str, typer.Option(help="First and last year, e.g. 2013-2014.")] = "2013-2014",
    aia: Annotated[str, typer.Option(help="AIA channels, comma-separated.")] = ",".join(
        AIA_CHANNELS
    ),
    hmi: Annotated[
        str, typer.Option(help="HMI channels, comma-separated ('' for none).")
    ] = ",".join(HMI_CHANNELS),
    size: Annotated[int, typer.Option(help="Frame size in pixels.")] = 512,
) -> None:
    """Write an archive-scale replica of SDOML v2: whole years, real-sized per-frame headers
    (the full level-1 keyword set), only a few chunks holding pixels."""
    from sdofm.archive.synthetic.replica import write_replica

    first, _, last = years.partition("-")
    t0 = time.perf_counter()
    with _progress(f"replica -> {out}") as update:
        report = write_replica(
            out,
            years=range(int(first), int(last or first) + 1),
            aia_channels=[c for c in aia.split(",") if c],
            hmi_channels=[c for c in hmi.split(",") if c],
            size=size,
            progress=update,
        )
    sizes = report.header_bytes.values()
    console.print(
        f"wrote {len(report.frames)} arrays, {sum(report.frames.values()):,} frames, to {out} in "
        f"{time.perf_counter() - t0:.0f} s; headers {min(sizes) / 1e6:.0f} .. "
        f"{max(sizes) / 1e6:.0f} MB per year and channel ({sum(sizes) / 1e9:.2f} GB in all)"
    )


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


def run_prepare(cfg, out: str) -> None:
    from sdofm.datasets.prepare import prepare

    _start_ray()
    with _progress(f"prepared shards -> {out}") as update:
        report = prepare(cfg, out, progress=update)
    for split, n in report.samples.items():
        console.print(
            f"{split}: {n:,} samples; {report.written[split]:,} shard(s) written, "
            f"{report.kept[split]:,} already there",
            highlight=False,
        )
    console.print(f"prepared {out} in {report.seconds:.1f} s", highlight=False)
    lost = sum(len(v) for s in report.skipped for v in s["samples"].values())
    _print_skipped(
        f"{len(report.skipped):,} unusable frame(s) skipped; {lost:,} sample(s) left out",
        report.skipped,
    )


@data_app.command("prepare")
def data_prepare(
    args: Annotated[
        list[str],
        typer.Argument(
            help="An optional YAML config and dotted overrides, then OUT_URL: the folder or "
            "fsspec URL to write the shards to.",
            show_default=False,
        ),
    ],
) -> None:
    """Write model-ready samples (limb, scaling, z-score, size; float16 / bfloat16) as
    shards, with Ray Data; resumes an interrupted run. Train on them with data.prepared=OUT_URL."""
    plain = [a for a in args if "=" not in a]
    if not plain:
        raise typer.BadParameter("give OUT_URL, the folder or URL to write the shards to")
    out = plain[-1]
    rest = [a for a in args if a is not out]
    with _friendly_errors():
        run_prepare(_load(rest), out)


@data_app.command("info")
def data_info(
    args: Args = None, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """What the stores hold: years, channels, frame counts, time span, gaps, chunking, codec."""
    with _friendly_errors():
        run_info(_load(args), as_json)


@data_app.command("ingest")
def data_ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder of level-1 FITS files (searched recursively) or a glob such as "
            "'fits/**/*.fits'.",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Argument(
            help="The data root (the store goes to OUT/sdomlv2.zarr or OUT/sdomlv2_hmi.zarr) "
            "or a store path ending in .zarr; created, or appended to.",
            show_default=False,
        ),
    ],
    instrument: Annotated[
        str, typer.Option(help="aia or hmi: which files to take (others are skipped).")
    ],
    size: Annotated[
        int | None,
        typer.Option(help="Frame size in pixels (default: the store's, else 512)."),
    ] = None,
    frames_per_chunk: Annotated[
        int | None,
        typer.Option(help="Frames per chunk of new arrays (default: the store's, else 15)."),
    ] = None,
    channel: Annotated[
        str | None,
        typer.Option(
            help="HMI: the component the files hold (Bx, By, Bz; magnetograms default to Bz). "
            "AIA: keep only this channel."
        ),
    ] = None,
    deg_cor: Annotated[
        list[str] | None,
        typer.Option(
            "--deg-cor",
            help="AIA degradation factor divided out, CHANNEL=FACTOR (repeatable; default 1).",
        ),
    ] = None,
) -> None:
    """Append AIA or HMI level-1 FITS files to an SDOML v2 store (the SDOML v2 recipe, Ray Data)."""
    if instrument.lower() not in ("aia", "hmi"):
        raise typer.BadParameter(f"--instrument must be aia or hmi, not {instrument!r}")
    with _friendly_errors():
        run_ingest(source, out, instrument.lower(), size, frames_per_chunk, channel, deg_cor)


# --------------------------------------------------------------------------- training


def run_pretrain(cfg):
    """Pretrain (writing the synthetic Sun first when data.root is empty); print where results are."""
    from sdofm.archive.synthetic import ensure_data
    from sdofm.pretraining import pretrain
    from sdofm.tracking import runs_page

    with _progress(f"no stores under {cfg.data.root}: writing the synthetic Sun") as update:
        ensure_data(cfg.data, cfg.synth, progress=update)
    t0 = time.perf_counter()
    result = pretrain(cfg)
    m = result.metrics
    table = Table(show_header=False, title=f"pretraining {cfg.model.name}: run {result.run_name!r}")
    rows = [
        ("steps", f"{m.get('step', '?')} in {time.perf_counter() - t0:.0f} s"),
        ("train loss (last interval)", f"{m['train/loss']:.4f}" if "train/loss" in m else "-"),
        ("val loss", f"{m['val/loss']:.4f}" if "val/loss" in m else "-"),
        *((k, f"{m[k]:.4f}") for k in ("val/elbo", "val/recon", "val/kl") if k in m),
        ("checkpoint", result.checkpoint),
        ("MLflow run id", result.run_id or "(tracking store unreachable: metrics kept locally)"),
        ("encoder model", result.model_uri or "-"),
        ("MLflow UI", f"mlflow ui --backend-store-uri {result.tracking_uri}"),
        ("runs view", runs_page(result.tracking_uri, cfg.tracking.experiment)),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    _print_run_skipped(result.skipped, result.run_id)
    return result


@app.command("pretrain")
def pretrain_cmd(args: Args = None) -> None:
    """Pretrain a backbone with Ray Train (DDP), checkpointed and logged to MLflow.

    Re-running with the same train.run_name continues from its last checkpoint.
    Uses RAY_ADDRESS when set, else starts a local Ray instance.
    """
    with _friendly_errors():
        cfg = _load(args)
        _start_ray(dashboard=True)
        run_pretrain(cfg)
    _where_logs()


Backbone = Annotated[
    str | None,
    typer.Option(
        help="Pretrained encoder: an MLflow run id, a models:/ URI or a checkpoint folder "
        "(default: the newest finished run of the pretraining experiment).",
        show_default=False,
    ),
]


def _task_help() -> str:
    from sdofm.finetuning.tasks import TASK_NAMES

    return f"The finetuning task: {', '.join(TASK_NAMES)}."


Task = Annotated[str, typer.Argument(help=_task_help(), show_default=False)]


def _check_task(name: str, cfg) -> None:
    """An unknown task, or a config the task cannot serve, is refused before Ray starts."""
    from sdofm.finetuning.tasks import get_task

    get_task(name).check(cfg)


def _with_backbone(args: list[str] | None, backbone: str | None) -> list[str]:
    return [*(args or []), f"finetune.backbone={backbone}"] if backbone else list(args or [])


def _metrics_table(title: str, metrics: dict, targets: list[str], columns: tuple) -> Table:
    keys = [f"{split}/{col}" for split in ("val", "test") for col in columns]
    table = Table("target", *(k.replace("/", " ") for k in keys), title=title)
    for c in ["", *targets]:
        suffix = f"_{c}" if c else ""
        table.add_row(
            c or "mean",
            *(f"{metrics[k + suffix]:.4f}" if k + suffix in metrics else "-" for k in keys),
        )
    return table


def run_finetune(cfg, task_name: str):
    from sdofm.finetuning.run import finetune
    from sdofm.finetuning.tasks import get_task

    task = get_task(task_name)
    result = finetune(cfg, task.name)
    title = f"{task.name} head {cfg.finetune.head!r}"
    console.print(_metrics_table(title, result.metrics, task.targets(cfg), task.columns))
    m = result.metrics
    for k in task.extra:
        console.print(
            f"{k}: "
            + "   ".join(f"{s} {m[f'{s}/{k}']:.4f}" for s in ("val", "test") if f"{s}/{k}" in m)
        )
    console.print(
        f"MLflow run id: {result.run_id}   model: {result.model_uri}   checkpoint: {result.checkpoint}"
    )
    _print_run_skipped(result.skipped, result.run_id)
    return result


@app.command("finetune")
def finetune_cmd(task: Task, args: Args = None, backbone: Backbone = None) -> None:
    """Train a science head on a pretrained backbone (one Ray Train run).

    dimming: AIA autocalibration, predict each AIA channel's dimming factor alpha.
    eve: virtual EVE, the MEGS-A line irradiances (data.eve_lines) from the images.
    missing-channel: reconstruct finetune.held_out (default 94A) from the other channels.
    finetune.head=baseline_cnn trains the from-scratch baseline instead.
    """
    with _friendly_errors():
        cfg = _load(_with_backbone(args, backbone))
        _check_task(task, cfg)
        _start_ray(dashboard=True)
        run_finetune(cfg, task)
    _where_logs()


def run_tune(cfg, task_name: str, num_samples=None, max_concurrent=None, resume=False):
    from sdofm.finetuning.tune import format_table, sweep
    from sdofm.tracking import runs_page, tracking_uri

    result = sweep(cfg, task_name, num_samples, max_concurrent, resume)
    console.print(format_table(result.table, cfg.tune.metric), highlight=False)
    if result.best:
        console.print(
            f"best trial {result.best['trial']}: {cfg.tune.metric} {result.best[cfg.tune.metric]:.4f}, "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.best.items() if k.startswith("test/"))
            + f", MLflow run {result.best['run_id']}"
        )
    _print_run_skipped(result.skipped, result.parent_run_id)
    console.print(
        f"sweep: {result.path}   MLflow parent run: {result.parent_run_id}   best head: {result.model_uri}\n"
        f"look: mlflow ui --backend-store-uri {tracking_uri(cfg.tracking.uri)}, then "
        f"{runs_page(tracking_uri(cfg.tracking.uri), cfg.finetune.experiment)}"
    )
    if result.interrupted:
        console.print("interrupted: run the same command with --resume to continue the sweep")
        raise typer.Exit(130)
    return result


@app.command("tune")
def tune_cmd(
    task: Task,
    args: Args = None,
    backbone: Backbone = None,
    num_samples: Annotated[
        int | None, typer.Option(help="Trials to run (default: tune.num_samples).")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Trials at once (default: tune.max_concurrent).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the interrupted sweep tune.name; finished trials are kept."),
    ] = False,
) -> None:
    """Sweep a head's hyperparameters (tune.space: lr, weight decay, head, unfrozen blocks,
    batch) with Ray Tune + ASHA.

    One MLflow parent run for the sweep, a child run per trial; the best head is logged as a model.
    """
    with _friendly_errors():
        cfg = _load(_with_backbone(args, backbone))
        _check_task(task, cfg)
        _start_ray(dashboard=True)
        run_tune(cfg, task, num_samples, max_concurrent, resume)
    _where_logs()


def run_evaluate(cfg, tasks: list[str] | None, n_boot: int):
    from sdofm.finetuning.evaluate import evaluate, format_board
    from sdofm.tracking import tracking_uri

    board = evaluate(cfg, tasks, n_boot)
    console.print(format_board(board), highlight=False, soft_wrap=True)
    console.print(
        f"MLflow run: {board.run_id} (scoreboard.txt, scoreboard.json; one child run per arm)\n"
        f"look: mlflow ui --backend-store-uri {tracking_uri(cfg.tracking.uri)}"
    )
    return board


@app.command("evaluate")
def evaluate_cmd(
    args: Args = None,
    backbone: Backbone = None,
    task: Annotated[
        list[str] | None, typer.Option(help="Task(s) to score (default: every task).")
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the test split.")] = 1000,
) -> None:
    """Score every head on the fixed test split against two controls (the same head on a
    randomly initialised encoder, and the from-scratch baseline), with bootstrap intervals;
    and the backbone's own masked reconstruction per channel against its random-init twin."""
    with _friendly_errors():
        cfg = _load(_with_backbone(args, backbone))
        _start_ray(dashboard=True)
        run_evaluate(cfg, task, bootstrap)
    _where_logs()


def run_embed(cfg, out: str, splits: tuple[str, ...], pool: str, shard_size: int):
    from sdofm.finetuning.embed import embed

    with _progress("embedding") as update:
        result = embed(cfg, out, splits, pool, shard_size, progress=update)
    rows = ", ".join(f"{s} {n}" for s, n in result.rows.items()) or "none (all shards present)"
    console.print(
        f"embeddings ({result.dim} values per sample, pool {pool!r}) in {out}: rows written {rows}; "
        f"shards written {result.shards_written}, kept {result.shards_kept}"
        + (f"; {result.skipped} samples skipped (unreadable frames)" if result.skipped else "")
        + f" in {result.seconds:.0f} s; MLflow run {result.run_id}",
        highlight=False,
    )
    return result


@app.command("embed")
def embed_cmd(
    args: Annotated[
        list[str],
        typer.Argument(
            help="An optional YAML config, the output folder or "
            "URL (any fsspec URL), then dotted overrides such as data.start=2012-11-01.",
            show_default=False,
        ),
    ],
    backbone: Backbone = None,
    split: Annotated[
        list[str] | None, typer.Option(help="Split(s) to embed (default: train, val and test).")
    ] = None,
    pool: Annotated[
        str,
        typer.Option(
            help="mean: mean of the patch tokens; summary: the summary token; tokens: all."
        ),
    ] = "mean",
    shard_size: Annotated[int, typer.Option(help="Samples per parquet shard.")] = 1024,
) -> None:
    """Embed a split or time range with a pretrained encoder (Ray Data batch inference,
    an actor pool on GPUs when present) into parquet shards; re-run to resume."""
    paths = [a for a in args if "=" not in a]
    if not paths:
        raise typer.BadParameter("give the output folder or URL (OUT_URL)")
    out = paths[-1]
    with _friendly_errors():
        cfg = _load(_with_backbone([*paths[:-1], *(a for a in args if "=" in a)], backbone))
        _start_ray(dashboard=True)
        run_embed(cfg, out, tuple(split or ("train", "val", "test")), pool, shard_size)
    _where_logs()


mlflow_app = typer.Typer(
    help="MLflow: a tracking server (no sub-command), or sync a run that lost its server.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(mlflow_app, name="mlflow")


@mlflow_app.callback()
def mlflow_cmd(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 only behind a firewall.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the UI and REST API.")] = 5000,
    backend_store_uri: Annotated[
        str, typer.Option(help="Where runs are kept (sqlite file or a database URL).")
    ] = "sqlite:///mlflow.db",
    artifacts_destination: Annotated[
        str | None,
        typer.Option(help="Artifact root (a folder, s3://, gs://); default: ./mlartifacts."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Server processes; default: MLflow's (4). 1 on a small machine."),
    ] = None,
) -> None:
    """Start an MLflow tracking server that Ray workers on other nodes can log to.

    Point jobs at it with MLFLOW_TRACKING_URI=http://HOST:PORT.
    """
    if ctx.invoked_subcommand is not None:
        return
    import os
    import sys

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
    ]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    if workers:
        cmd += ["--workers", str(workers)]
    console.print(
        f"MLflow server on http://{host}:{port} (export MLFLOW_TRACKING_URI=http://{host}:{port})"
    )
    os.execv(sys.executable, cmd)


@mlflow_app.command("sync")
def mlflow_sync(
    folder: Annotated[
        str,
        typer.Argument(
            help="The run's tracking folder, <train.storage_path>/<run name>/tracking, as "
            "printed when the server was lost (a folder or URL).",
            show_default=False,
        ),
    ],
    args: Args = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="Send to this server instead of the one the run used."),
    ] = None,
) -> None:
    """Merge what a run kept locally while its MLflow server was down (metrics, figures,
    tags) into its run, and close the run with the status it ended with.

    Steps the run already holds are not sent again. ARGS (train.storage_options=...) reach
    an object store; run it once the server is back.
    """
    from sdofm.tracking import sync

    with _friendly_errors():
        cfg = _load(args)
        try:
            done = sync(folder, cfg.train.storage_options, tracking_uri)
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None
    console.print(
        f"run {done['run_id']} at {done['tracking_uri']}: {done['metric_steps']} steps of "
        f"metrics, {done['figures']} figures, {done['tags']} tags sent; "
        f"status {done['status'] or 'left as it was'}",
        highlight=False,
    )


@app.command("demo")
def demo(args: Args = None) -> None:
    """The main job on the embedded default: synthetic Sun -> index -> statistics ->
    MAE pretraining -> a small Ray Tune sweep of the dimming head on that backbone.

    `make demo` passes configs/tune/dimming.yaml (minutes on a laptop CPU).
    """
    from sdofm.tracking import runs_page, tracking_uri

    with _friendly_errors():
        cfg = _load(args)
        _start_ray(dashboard=True)  # one Ray instance for every stage
        console.rule("1/5 the synthetic Sun")
        run_synth(cfg)
        console.rule("2/5 the alignment index")
        run_index(cfg)
        run_info(cfg)
        console.rule("3/5 normalisation statistics")
        run_stats(cfg)
        console.rule(f"4/5 pretraining {cfg.model.name}")
        pretrained = run_pretrain(cfg)
        backbone = pretrained.run_id or pretrained.checkpoint
        cfg.finetune.backbone = backbone
        console.rule("5/5 dimming sweep on that backbone")
        swept = run_tune(cfg, "dimming")
        console.rule("where to look")
        uri = tracking_uri(cfg.tracking.uri)
        console.print(
            f"MLflow UI:        mlflow ui --backend-store-uri {uri}\n"
            f"pretraining run:  {pretrained.run_id} (experiment {cfg.tracking.experiment!r}: "
            f"{runs_page(uri, cfg.tracking.experiment)})\n"
            f"dimming sweep:    {swept.parent_run_id} (experiment {cfg.finetune.experiment!r}: "
            f"{runs_page(uri, cfg.finetune.experiment)}), "
            f"best trial run {swept.best['run_id'] if swept.best else '-'}\n"
            f"checkpoints:      {pretrained.checkpoint}, {swept.path}",
            highlight=False,
        )
    _where_logs()


if __name__ == "__main__":
    app()

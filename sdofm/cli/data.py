"""``sdofm data``: write the synthetic Sun or a replica, ingest FITS, inspect stores, build
the alignment index, the statistics and the prepared shards."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from sdofm.cli.common import (
    Args,
    console,
    friendly_errors,
    load_args,
    print_skipped,
    progress,
    start_ray,
)
from sdofm.constants import AIA_CHANNELS, HMI_CHANNELS

data_app = typer.Typer(
    help="SDOML stores: write the synthetic Sun, inspect stores, build the alignment index.",
    no_args_is_help=True,
)


def _du(url: str, storage_options: dict) -> int:
    from sdofm.storage import open_url

    fs, path = open_url(url, storage_options)
    return int(fs.du(path)) if fs.exists(path) else 0


def run_synth(cfg) -> None:
    from sdofm.archive.synthetic import write_synthetic

    t0 = time.perf_counter()
    with progress(f"synthetic Sun -> {cfg.data.root}") as update:
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
    with progress("reading headers") as update:
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
    start_ray()
    with progress(f"ingest {instrument.upper()} FITS -> {out}") as update:
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


def run_stats(cfg, recompute: bool = False) -> None:
    from sdofm.datasets.index import load_or_build_index
    from sdofm.datasets.stats import load_or_compute_stats

    table, _ = load_or_build_index(cfg.data)
    start_ray()
    t0 = time.perf_counter()
    with console.status("normalisation statistics over the train split (Ray Data)"):
        stats = load_or_compute_stats(
            cfg.data, cfg.transform, cfg.loader, table, recompute=recompute
        )
    console.print(
        f"statistics of {stats['samples']:,} train samples in {time.perf_counter() - t0:.1f} s: {stats['path']}"
    )
    skipped = stats.get("skipped") or {}
    print_skipped(
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


def run_prepare(cfg, out: str) -> None:
    from sdofm.datasets.prepare import prepare

    start_ray()
    with progress(f"prepared shards -> {out}") as update:
        report = prepare(cfg, out, progress=update)
    for split, n in report.samples.items():
        console.print(
            f"{split}: {n:,} samples; {report.written[split]:,} shard(s) written, "
            f"{report.kept[split]:,} already there",
            highlight=False,
        )
    console.print(f"prepared {out} in {report.seconds:.1f} s", highlight=False)
    lost = sum(len(v) for s in report.skipped for v in s["samples"].values())
    print_skipped(
        f"{len(report.skipped):,} unusable frame(s) skipped; {lost:,} sample(s) left out",
        report.skipped,
    )


@data_app.command("synth")
def data_synth(args: Args = None) -> None:
    """Write the synthetic Sun (AIA, HMI, EVE in the SDOML v2 layout + truth) to data.root."""
    with friendly_errors():
        run_synth(load_args(args))


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
    with progress(f"replica -> {out}") as update:
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
    with friendly_errors():
        run_index(load_args(args), rebuild)


@data_app.command("stats")
def data_stats(
    args: Args = None,
    recompute: Annotated[bool, typer.Option(help="Recompute even if current.")] = False,
) -> None:
    """Per-channel normalisation statistics of the train split, computed with Ray Data."""
    with friendly_errors():
        run_stats(load_args(args), recompute)


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
    with friendly_errors():
        run_prepare(load_args(rest), out)


@data_app.command("info")
def data_info(
    args: Args = None, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """What the stores hold: years, channels, frame counts, time span, gaps, chunking, codec."""
    with friendly_errors():
        run_info(load_args(args), as_json)


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
    with friendly_errors():
        run_ingest(source, out, instrument.lower(), size, frames_per_chunk, channel, deg_cor)

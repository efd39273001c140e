"""Ingest AIA and HMI level-1 FITS files into an SDOML v2 store with Ray Data.

Each file goes through the SDOML v2 recipe of :mod:`sdofm.archive.fits`, and its
frame through :class:`~sdofm.archive.writer.FrameWriter`, the writer of the
synthetic Sun too: the same year groups, arrays, chunking and codec.

The job has two Ray Data passes: headers (cheap: what to skip, what the store
already holds, the order to append in), then pixels, streamed back in time order
to the driver, the only process that writes. A bad file is skipped and reported,
never fatal. Headers are committed after their pixels, every ``commit_every``
frames and at the end, so a crash leaves a store that opens; a re-run drops the
uncommitted tail and adds only what is missing.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdofm.archive.fits import SkipFrame, check_header, process_file, read_fits
from sdofm.archive.writer import FrameWriter
from sdofm.constants import AIA_CHANNELS, SDOML_RESOLUTION
from sdofm.datasets.sdoml import (
    INSTRUMENT_CHANNELS,
    STORE_NAMES,
    LayoutError,
    SDOMLError,
    clear_header_cache,
    open_group,
    parse_times,
)
from sdofm.storage import join, open_url

FRAMES_PER_CHUNK = 15  # as the SDOML v2 converter scripts
FITS_SUFFIXES = (".fits", ".fts", ".fit", ".fits.gz", ".fts.gz", ".fit.gz")


class IngestError(SDOMLError):
    """The ingest cannot start: no input files, or arguments that do not fit the instrument."""


@dataclass
class IngestReport:
    """What one ingest run did."""

    store: str
    instrument: str
    files: int = 0
    ingested: dict[str, int] = field(default_factory=dict)  # channel -> frames added
    already: list[str] = field(default_factory=list)  # files whose frame the store holds
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    dropped_uncommitted: int = 0  # frames of an interrupted run removed before appending
    seconds: float = 0.0

    @property
    def n_ingested(self) -> int:
        return sum(self.ingested.values())

    @property
    def frames_per_s(self) -> float:
        return self.n_ingested / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- files and headers


def find_fits(source: str | Sequence[str]) -> list[str]:
    """FITS files under a folder (recursively), matching a glob, or named; absolute, sorted."""
    sources = [source] if isinstance(source, str) else list(source)
    found: set[str] = set()
    for s in sources:
        if os.path.isdir(s):
            for root, _dirs, names in os.walk(s):
                found.update(
                    os.path.join(root, n) for n in names if n.lower().endswith(FITS_SUFFIXES)
                )
        elif any(ch in s for ch in "*?["):
            found.update(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(s):
            found.add(s)
        else:
            raise IngestError(f"{s}: no such file or folder, and not a glob pattern")
    if not found:
        raise IngestError(
            f"no FITS files ({', '.join('*' + x for x in FITS_SUFFIXES)}) in {', '.join(sources)}"
        )
    return sorted(os.path.abspath(p) for p in found)


# --------------------------------------------------------------------------- Ray Data passes


def _plan_batch(batch: dict[str, np.ndarray], instrument: str, channel: str | None) -> dict:
    rows: dict[str, list] = {k: [] for k in ("path", "channel", "t_obs", "time_ns", "reason")}
    for path in batch["path"]:
        info, reason = None, ""
        try:
            info = check_header(read_fits(str(path), with_data=False)[0], instrument, channel)
        except SkipFrame as e:
            reason = str(e)
        except Exception as e:  # a file must never stop the job
            reason = f"{type(e).__name__}: {e}"
        rows["path"].append(str(path))
        rows["channel"].append(info.channel if info else "")
        rows["t_obs"].append(info.t_obs if info else "")
        rows["time_ns"].append(info.time_ns if info else 0)
        rows["reason"].append(reason)
    return {k: np.asarray(v, dtype=np.int64 if k == "time_ns" else object) for k, v in rows.items()}


def _process_batch(
    batch: dict[str, np.ndarray],
    instrument: str,
    size: int,
    channel: str | None,
    deg_cor: dict[str, float],
) -> dict:
    n = len(batch["path"])
    frames = np.zeros((n, size, size), np.float32)
    headers, reasons = [], []
    for j, path in enumerate(batch["path"]):
        reason, attrs = "", {}
        try:
            info, frames[j], attrs = process_file(str(path), instrument, size, channel, deg_cor)
            if (info.channel, info.time_ns) != (batch["channel"][j], batch["time_ns"][j]):
                reason = "the file changed while it was being ingested"
        except SkipFrame as e:
            reason = str(e)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
        headers.append(json.dumps(attrs))
        reasons.append(reason)
    return {
        **batch,
        "frame": frames,
        "header": np.asarray(headers, dtype=object),
        "reason": np.asarray(reasons, dtype=object),
    }


def _dataset(items: list[dict], fn: Callable, batch_size: int, num_cpus: float, **kwargs):
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    ds = ds.map_batches(
        fn, batch_size=batch_size, num_cpus=num_cpus, batch_format="numpy", fn_kwargs=kwargs
    )
    ds.context.execution_options.preserve_order = True  # append in the planned (time) order
    ds.context.enable_progress_bars = False  # the caller shows one
    return ds


# --------------------------------------------------------------------------- the store


def store_url(out: str, instrument: str) -> str:
    """``out`` itself when it names a ``.zarr`` store, else the SDOML v2 store name under it."""
    if out.rstrip("/").endswith(".zarr"):
        return out.rstrip("/")
    return join(out, STORE_NAMES[instrument][0])


@dataclass
class _Target:
    group: Any
    size: int | None  # frame size of the arrays it holds, None when empty
    frames_per_chunk: int | None
    times: dict[str, set[int]]  # channel -> committed frame times (UTC ns)
    dropped: int  # uncommitted frames removed


def _open_target(url: str, instrument: str, storage_options: dict | None) -> _Target:
    """Open (or create) the store to append to; :class:`LayoutError` if it has another layout."""
    fs, path = open_url(url, storage_options)
    name = instrument.upper()
    if not fs.exists(path):  # created when the first frame is written
        return _Target(group=None, size=None, frames_per_chunk=None, times={}, dropped=0)
    if fs.isfile(path):
        raise LayoutError(f"{url} is a file, not an SDOML {name} store")
    if fs.exists(join(path, "zarr.json")):
        raise LayoutError(
            f"{url} is a zarr format 3 store; SDOML stores are zarr format 2: "
            "choose another output folder"
        )
    if not fs.exists(join(path, ".zgroup")) and fs.ls(path):
        raise LayoutError(
            f"{url} exists and is not a zarr group (no .zgroup): choose a new folder "
            f"or an SDOML {name} store to append to"
        )
    group = open_group(url, storage_options, mode="a")
    attrs = dict(group.attrs)
    if attrs.get("sdofm_synthetic"):
        raise LayoutError(
            f"{url} holds the synthetic Sun written by `sdofm data synth`: ingest real frames "
            "into another folder"
        )
    if attrs.get("instrument") and str(attrs["instrument"]).upper() != name:
        raise LayoutError(f"{url} is an {attrs['instrument']} store, not an {name} store")
    known = INSTRUMENT_CHANNELS[instrument]
    problems: list[str] = []
    problems += [f"array {k!r} at the top level" for k, _ in group.arrays()]
    sizes: set[int] = set()
    chunks: set[int] = set()
    arrays = []
    for year, ygroup in group.groups():
        if not (len(year) == 4 and year.isdigit()):
            problems.append(f"group {year!r} is not a year")
            continue
        problems += [f"group {year}/{k} inside a year" for k, _ in ygroup.groups()]
        for ch, a in ygroup.arrays():
            if ch not in known:
                problems.append(f"{year}/{ch} is not an {name} channel ({', '.join(known)})")
            elif a.ndim != 3 or a.dtype != np.float32 or a.shape[1] != a.shape[2]:
                problems.append(
                    f"{year}/{ch} has shape {a.shape}, dtype {a.dtype}; expected (N, S, S) float32"
                )
            else:
                sizes.add(int(a.shape[1]))
                chunks.add(int(a.chunks[0]))
                arrays.append((year, ch, a))
    if len(sizes) > 1:
        problems.append(f"frames of several sizes: {sorted(sizes)}")
    if problems:
        raise LayoutError(
            f"{url} is not an SDOML {name} store sdofm can append to:\n  " + "\n  ".join(problems)
        )
    if not attrs and not arrays:
        group.update_attributes({"instrument": name, "sdofm_ingest": True})
        attrs = dict(group.attrs)
    times: dict[str, set[int]] = {}
    dropped = 0
    for _year, ch, a in arrays:
        raw = a.attrs.get("T_OBS")
        committed = len(raw) if isinstance(raw, list) else 0
        if a.shape[0] > committed and attrs.get("sdofm_ingest"):
            # Our own interrupted run: pixels past the header lists were never committed.
            dropped += a.shape[0] - committed
            a.resize((committed, *a.shape[1:]))
        if committed:
            t, bad = parse_times(raw)
            times.setdefault(ch, set()).update(t[~bad].astype(np.int64).tolist())
    return _Target(
        group=group,
        size=next(iter(sizes)) if sizes else None,
        frames_per_chunk=min(chunks) if chunks else None,
        times=times,
        dropped=dropped,
    )


# --------------------------------------------------------------------------- the job


@dataclass
class _Job:
    """The settings of one run, as the Ray tasks and the writer need them."""

    url: str
    instrument: str
    size: int
    frames_per_chunk: int
    channel: str | None
    deg_cor: dict[str, float]
    storage_options: dict | None
    commit_every: int
    batch_size: int | None
    num_cpus: float


def ingest(
    source: str | Sequence[str],
    out: str,
    instrument: str,
    *,
    size: int | None = None,
    frames_per_chunk: int | None = None,
    channel: str | None = None,
    deg_cor: Mapping[str, float] | None = None,
    storage_options: dict | None = None,
    commit_every: int = 1000,
    batch_size: int | None = None,
    num_cpus: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Append the frames of level-1 FITS files to the SDOML store ``store_url(out, instrument)``.

    ``source``: a folder (searched recursively), a glob or a list of files.
    ``size``: output frame size (default: the store's, else 512). ``frames_per_chunk``:
    chunking of new arrays (default: the store's, else 15). ``channel``: HMI component
    the files hold (default: ``Bz`` for line-of-sight magnetograms), or the one AIA
    channel to keep. ``deg_cor``: AIA channel -> degradation factor divided out.
    Re-running over the same files adds nothing: a frame is known by channel and
    ``T_OBS``. Headers are committed every ``commit_every`` frames of an array and
    at the end. Ray tasks take ``batch_size`` files (default: about four tasks per
    task slot of the cluster, at most 16 files) and ``num_cpus`` CPUs each.
    ``progress(done, total)`` counts files read, headers then pixels. Uses the
    running Ray instance (Ray Data starts a local one otherwise).
    """
    t0 = time.perf_counter()
    if instrument not in INSTRUMENT_CHANNELS:
        raise IngestError(f"instrument must be aia or hmi, not {instrument!r}")
    known = INSTRUMENT_CHANNELS[instrument]
    if channel is not None and channel not in known:
        raise IngestError(
            f"channel {channel!r} is not an {instrument.upper()} channel ({', '.join(known)})"
        )
    deg = {str(k): float(v) for k, v in (deg_cor or {}).items()}
    for k, v in deg.items():
        if k not in AIA_CHANNELS or instrument != "aia":
            raise IngestError(
                f"degradation factor for {k!r}: not an AIA channel ({', '.join(AIA_CHANNELS)})"
            )
        if not (math.isfinite(v) and v > 0):
            raise IngestError(f"degradation factor for {k} must be > 0, got {v}")
    files = find_fits(source)
    url = store_url(out, instrument)
    target = _open_target(url, instrument, storage_options)
    if size is not None and target.size is not None and size != target.size:
        raise LayoutError(f"{url} holds {target.size} px frames: cannot add {size} px frames")
    job = _Job(
        url=url,
        instrument=instrument,
        size=size or target.size or SDOML_RESOLUTION,
        frames_per_chunk=frames_per_chunk or target.frames_per_chunk or FRAMES_PER_CHUNK,
        channel=channel,
        deg_cor=deg,
        storage_options=storage_options,
        commit_every=commit_every,
        batch_size=batch_size,
        num_cpus=num_cpus,
    )
    report = IngestReport(store=url, instrument=instrument.upper(), files=len(files))
    report.dropped_uncommitted = target.dropped
    total, done = len(files), 0

    # Pass 1: headers only.
    heads = _dataset(
        [{"path": p} for p in files],
        _plan_batch,
        32,
        num_cpus,
        instrument=instrument,
        channel=channel,
    )
    rows: list[dict] = []
    for batch in heads.iter_batches(batch_size=None, batch_format="numpy"):
        rows += [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        done += len(batch["path"])
        if progress:
            progress(done, total)
    plan: list[dict] = []
    first: dict[tuple[str, int], str] = {}
    for r in rows:
        key = (str(r["channel"]), int(r["time_ns"]))
        if r["reason"]:
            report.skipped.append((r["path"], r["reason"]))
        elif key[1] in target.times.get(key[0], ()):
            report.already.append(r["path"])
        elif key in first:
            report.skipped.append((r["path"], f"same channel and T_OBS as {first[key]}"))
        else:
            first[key] = r["path"]
            year = str(np.datetime64(key[1], "ns").astype("datetime64[Y]"))
            plan.append({"path": r["path"], "channel": key[0], "time_ns": key[1], "year": year})
    plan.sort(key=lambda r: (r["year"], r["channel"], r["time_ns"], r["path"]))
    total += len(plan)
    if progress:
        progress(done, total)

    # Pass 2: pixels, back in plan order; only this process writes.
    if plan:
        group = target.group if target.group is not None else _create_store(job)
        _write(plan, group, job, report, lambda n: progress(done + n, total) if progress else None)
    clear_header_cache()
    report.seconds = time.perf_counter() - t0
    return report


def _auto_batch(n_files: int, num_cpus: float) -> int:
    """Files per task: tasks enough to keep every slot busy, few enough that small frames
    are not all Ray overhead (a task costs tens of ms, a 128 px frame about 3)."""
    import ray

    slots = max(1, int(ray.cluster_resources().get("CPU", 1) / num_cpus))
    return int(np.clip(n_files // (4 * slots), 1, 16))


def _create_store(job: _Job):
    group = open_group(job.url, job.storage_options, mode="a")
    group.update_attributes({"instrument": job.instrument.upper(), "sdofm_ingest": True})
    return group


def _write(
    plan: list[dict], group, job: _Job, report: IngestReport, tick: Callable[[int], None]
) -> None:
    """Receive the prepared frames in plan order and append them, one writer per (year, channel)."""
    reserve = Counter((r["year"], r["channel"]) for r in plan)
    writers: dict[tuple[str, str], FrameWriter] = {}
    since_commit: Counter = Counter()
    pool = ThreadPoolExecutor(1)  # compression overlaps with receiving the next frames
    done = 0
    try:
        ds = _dataset(
            plan,
            _process_batch,
            job.batch_size or _auto_batch(len(plan), job.num_cpus),
            job.num_cpus,
            instrument=job.instrument,
            size=job.size,
            channel=job.channel,
            deg_cor=job.deg_cor,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for j in range(len(batch["path"])):
                done += 1
                if batch["reason"][j]:
                    report.skipped.append((str(batch["path"][j]), str(batch["reason"][j])))
                    continue
                key = (str(batch["year"][j]), str(batch["channel"][j]))
                w = writers.get(key)
                if w is None:
                    new = key[0] not in group or key[1] not in group[key[0]]
                    w = writers[key] = FrameWriter(
                        group.require_group(key[0]),
                        key[1],
                        job.size,
                        job.frames_per_chunk,
                        pool,
                        reserve=reserve[key],
                    )
                    if new:  # an empty T_OBS list at once: the store opens even if we stop now
                        w.commit()
                w.add(batch["frame"][j], json.loads(str(batch["header"][j])))
                report.ingested[key[1]] = report.ingested.get(key[1], 0) + 1
                since_commit[key] += 1
                if since_commit[key] >= job.commit_every:
                    w.commit()
                    since_commit[key] = 0
            tick(done)
        for w in writers.values():
            w.close()
    finally:
        pool.shutdown()
        clear_header_cache()  # headers this process read before are stale, even after a failure

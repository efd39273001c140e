"""Loader benchmark: samples/s delivered to a consumer from SDOML stores, four ways.

Run from the repository root::

    .venv/bin/python bench/loader.py [--days D] [--resolution R] [--cpus N] [--root DIR]
                                     [--samples K] [--readers R] [--cpus-per-reader F]
                                     [--block-size B] [--warmup W] [--repeat P]

Two synthetic SDOML v2 archives are written under ``--root`` (default
``/tmp/sdofm-bench``; reused while their synth settings match): 9 AIA + 3 HMI
channels at ``--resolution`` px over ``--days`` days, one stored with 1 frame per
zarr chunk and one with 15 (the SDOML v2 converter's layout). The alignment index
(12-min grid, every row in the train split) is built or reused, and every
contender delivers the same samples: the train rows of the index, T=1, all 12
channels (``--samples K``: the first K rows in time order only).

Contenders, each given the same number of CPUs (``--cpus``, default 2):

(a) ``limit``: raw zarr read + decode, no transforms, no delivery. The chunks that
    hold the frames the index rows point to are shared among a process pool of N
    workers; each reads its chunks whole, decoding each chunk once. This is the
    ceiling for any loader that decodes these stores on these CPUs (the main process
    only collects frame counts: no sample is assembled or moved between processes).
(b) ``seed``: SDO-FM's original loader: a ``torch.utils.data.Dataset`` whose
    ``__getitem__(i)`` looks the row up with ``DataFrame.iloc[i]`` and reads one
    frame per channel (``array[idx]``, which decodes that frame's whole chunk),
    stacked to a ``(C, H, W)`` float32 tensor, through ``DataLoader(num_workers=N,
    batch_size=8, shuffle=True)``. No transforms (the sdofm pipeline does more work).
(c) ``sdofm streaming``: ``SDOMLPipeline(...).dataset("train")`` (chunk-aware
    readers, limb + scaling + z-score transforms), full passes of
    ``ds.iter_batches(batch_size=8)``; each pass pays whatever reader start-up the
    pipeline needs per epoch, as each epoch of a training run does.
    ``loader.readers`` x ``loader.cpus_per_reader`` reserve the N CPUs (default N
    readers x 1 CPU, which measured faster than 2N x 0.5), ``loader.block_size`` 32.
    Index and statistics are built (or reused) before any timer starts.
(d) ``sdofm materialised``: ``pipe.dataset("train", epoch=0).materialize()`` (its own
    row), then a pass of ``m.iter_batches(batch_size=8)`` (from the object store).

Each contender runs ``--warmup`` untimed passes (default 1), then ``--repeat`` timed
passes (default 2) of which the fastest is reported: the machine may be shared, and
the fastest pass is the one least disturbed. samples/s = samples delivered / wall
time of the pass (``time.perf_counter``), worker start-up included for (b), (c) and
(d) (they pay it every epoch) and excluded for (a) (a ceiling). Every contender
asserts that it delivered exactly the index rows (and, where the sample ids are
known, exactly that set). Before timing, every store file is read once so all
contenders run from a warm page cache: this measures decode and delivery, not disk.
(a) and (b) run before Ray starts (they fork worker processes); (c) and (d) share
one ``ray.init(num_cpus=N)``.

Printed: one table row per contender per chunking, the ratios (c)/(b) and (c)/(a)
against the performance goal (on 2 cores: (c) >= 1.5x (b) with 1-frame chunks,
>= 5x (b) with 15-frame chunks, (c) >= 0.8x (a) on both), the machine, the sdofm
revision measured, and how busy the CPUs were just before the run (other work on
the machine makes every number unreliable).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

import sdofm
from sdofm.archive.synthetic import write_synthetic
from sdofm.config import Config, load_config
from sdofm.datasets.index import load_or_build_index, make_windows
from sdofm.datasets.sdoml import Archive

CHUNKINGS = (1, 15)  # frames per zarr chunk of the two stores
BATCH_SIZE = 8
GOALS = {  # chunking -> minimum (c)/(b), minimum (c)/(a); the issue's goal on 2 cores
    1: (1.5, 0.8),
    15: (5.0, 0.8),
}


@dataclass
class Store:
    """One synthetic archive and the samples every contender reads from it."""

    frames_per_chunk: int
    cfg: Config
    samples: pd.DataFrame  # one index row per sample (T=1), time order
    subset: np.ndarray | None  # sample ids passed to the pipeline (None: the whole split)
    urls: dict[str, str]  # channel -> local path of its zarr store

    @property
    def channels(self) -> list[str]:
        return self.cfg.data.channels

    @property
    def n(self) -> int:
        return len(self.samples)


@dataclass
class Result:
    chunking: int
    contender: str
    samples: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.samples / self.seconds

    def row(self) -> str:
        return (
            f"{f'{self.chunking} frame/chunk':<16} {self.contender:<34} {self.samples:>8} "
            f"{self.seconds:>9.2f} {self.rate:>10.2f}"
        )


# --------------------------------------------------------------------------- setup


def make_config(
    root: Path,
    frames_per_chunk: int,
    args: argparse.Namespace,
    readers: int,
    cpus_per_reader: float,
) -> Config:
    """The config of one store; the folder name carries the synth settings so stores are reused."""
    store_root = (
        root / f"r{args.resolution}-d{args.days}-aia{args.aia_cadence}m-fpc{frames_per_chunk}"
    )
    return load_config(
        None,
        [
            f"data.root={store_root}",
            f"synth.resolution={args.resolution}",
            f"synth.periods=[{{start: 2011-10-01, days: {args.days}}}]",
            f"synth.frames_per_chunk={frames_per_chunk}",
            f"synth.aia_cadence={args.aia_cadence}min",
            "data.split.val_months=[]",  # every aligned step is a train sample
            "data.split.test_months=[]",
            f"data.cache_dir={store_root}/cache",
            f"loader.readers={readers}",
            f"loader.cpus_per_reader={cpus_per_reader}",
            f"loader.block_size={args.block_size}",
        ],
    )


def prepare(cfg: Config, frames_per_chunk: int, limit: int | None) -> Store:
    """Write (or reuse) the stores, build (or reuse) the index, pick the train samples."""
    t0 = time.perf_counter()
    report = write_synthetic(cfg.synth, cfg.data.root, cfg.data.storage_options)
    t1 = time.perf_counter()
    table, index_report = load_or_build_index(cfg.data)
    t2 = time.perf_counter()
    # The pipeline's own definition of a train sample (T=1): windows of one row.
    rows = make_windows(table, 1, cfg.data.effective_frame_step, split="train")[:, 0]
    subset = None
    if limit is not None and limit < len(rows):
        subset = np.arange(limit)  # sample ids are positions in this time-ordered list
        rows = rows[subset]
    archive = Archive.open(cfg.data)
    urls = {c: archive.aia.url for c in cfg.data.aia_channels}
    urls.update({c: archive.hmi.url for c in cfg.data.hmi_channels})
    written = "reused" if report.reused else f"written in {t1 - t0:.0f} s"
    indexed = "reused" if index_report.reused else f"built in {t2 - t1:.1f} s"
    print(
        f"store fpc={frames_per_chunk}: {cfg.data.root} ({written}), "
        f"index {index_report.n_rows} rows ({indexed}), {len(rows)} train samples",
        flush=True,
    )
    return Store(frames_per_chunk, cfg, table.iloc[rows].reset_index(drop=True), subset, urls)


def warm_page_cache(root: str) -> int:
    """Read every file under ``root`` once so no contender pays for cold disk reads."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


def consume(batches: Iterable, images: str | int, ids: str | int) -> tuple[int, np.ndarray]:
    """Count the samples of ``batches`` (the consumer); returns the count and the sample ids."""
    n, seen = 0, []
    for b in batches:
        n += len(b[images])
        seen.append(np.asarray(b[ids]))
    return n, np.concatenate(seen) if seen else np.zeros(0, np.int64)


def check_delivery(store: Store, contender: str, n: int, ids: np.ndarray) -> None:
    """Every contender must deliver exactly the index rows, each once."""
    assert n == store.n, f"{contender}: delivered {n} samples, the index has {store.n}"
    assert np.array_equal(np.sort(ids), np.arange(store.n)), f"{contender}: wrong sample ids"


def fastest(passes: int, run_pass: Callable[[], float]) -> float:
    """The shortest of ``passes`` timed passes (each checks its own delivery)."""
    return min(run_pass() for _ in range(max(passes, 1)))


# --------------------------------------------------------------------------- (a) the limit

# Per worker process: (url, year, channel) -> zarr array, opened once.
_ARRAYS: dict[tuple[str, str, str], object] = {}


def _open_array(url: str, year: str, channel: str):
    import zarr

    key = (url, year, channel)
    if key not in _ARRAYS:
        _ARRAYS[key] = zarr.open_group(url, mode="r")[f"{year}/{channel}"]
    return _ARRAYS[key]


def _open_all(keys: list[tuple[str, str, str]]) -> None:
    """Pool initializer: open every array up front (the limit excludes setup)."""
    for key in keys:
        _open_array(*key)


def _decode_chunk(task: tuple[str, str, str, int, np.ndarray]) -> int:
    """Read one chunk whole (one decode) and pick the frames the samples need."""
    url, year, channel, chunk_id, offsets = task
    a = _open_array(url, year, channel)
    k = a.chunks[0]
    block = a[chunk_id * k : min((chunk_id + 1) * k, a.shape[0])]
    frames = block[offsets]
    assert frames.shape[1:] == a.shape[1:]
    return len(frames)


def chunk_tasks(store: Store) -> list[tuple[str, str, str, int, np.ndarray]]:
    """One task per chunk holding a needed frame: which frames of it (offsets) are needed."""
    tasks = []
    for c in store.channels:
        url = store.urls[c]
        for year, group in store.samples.groupby(f"{c}_year"):
            k = _open_array(url, str(year), c).chunks[0]
            # A frame shared by two rows is decoded once.
            idx = np.unique(group[f"{c}_idx"].to_numpy())
            for chunk_id in np.unique(idx // k):
                sel = idx[idx // k == chunk_id]
                tasks.append((url, str(year), c, int(chunk_id), sel - chunk_id * k))
    return tasks


def run_limit(store: Store, cpus: int, warmup: int, repeat: int) -> Result:
    tasks = chunk_tasks(store)
    wanted = sum(  # distinct frames the samples reference
        len(store.samples[[f"{c}_year", f"{c}_idx"]].drop_duplicates()) for c in store.channels
    )
    keys = sorted({t[:3] for t in tasks})
    chunksize = max(1, len(tasks) // (8 * cpus))  # small enough to balance the workers

    def run_pass(pool) -> float:
        t0 = time.perf_counter()
        frames = sum(pool.imap_unordered(_decode_chunk, tasks, chunksize=chunksize))
        seconds = time.perf_counter() - t0
        assert frames == wanted, f"limit: decoded {frames} frames, the samples need {wanted}"
        return seconds

    with mp.get_context("fork").Pool(cpus, initializer=_open_all, initargs=(keys,)) as pool:
        for _ in range(warmup):
            run_pass(pool)
        seconds = fastest(repeat, lambda: run_pass(pool))
    return Result(store.frames_per_chunk, "(a) limit: zarr read+decode", store.n, seconds)


# --------------------------------------------------------------------------- (b) the seed


class SeedDataset(Dataset):
    """SDO-FM's original loader: a pandas row lookup and one zarr read per channel per sample."""

    def __init__(self, samples: pd.DataFrame, channels: list[str], urls: dict[str, str]):
        self.table, self.channels, self.urls = samples, channels, urls
        self.years = {c: [str(y) for y in samples[f"{c}_year"].unique()] for c in channels}
        self.arrays: dict[tuple[str, str], object] | None = None  # opened once per worker

    def __len__(self) -> int:
        return len(self.table)

    def _open(self) -> dict[tuple[str, str], object]:
        import zarr

        groups = {url: zarr.open_group(url, mode="r") for url in set(self.urls.values())}
        return {
            (y, c): groups[self.urls[c]][f"{y}/{c}"] for c in self.channels for y in self.years[c]
        }

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        if self.arrays is None:  # first item in this worker process
            self.arrays = self._open()
        row = self.table.iloc[i]
        frames = [
            self.arrays[(str(row[f"{c}_year"]), c)][int(row[f"{c}_idx"])] for c in self.channels
        ]
        return i, torch.from_numpy(np.stack(frames).astype(np.float32, copy=False))


def run_seed(store: Store, cpus: int, warmup: int, repeat: int) -> Result:
    loader = DataLoader(
        SeedDataset(store.samples, store.channels, store.urls),
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=cpus,
        multiprocessing_context="fork",  # the cheapest start for the seed's workers
        generator=torch.Generator().manual_seed(0),
    )

    def run_pass() -> float:
        # One epoch, worker start-up included (as for every epoch of the seed's training loop).
        t0 = time.perf_counter()
        n, ids = consume(loader, images=1, ids=0)
        seconds = time.perf_counter() - t0
        check_delivery(store, "seed", n, ids)
        return seconds

    for _ in range(warmup):
        run_pass()
    seconds = fastest(repeat, run_pass)
    return Result(store.frames_per_chunk, "(b) seed: torch DataLoader", store.n, seconds)


# --------------------------------------------------------------------------- (c), (d) sdofm


def ray_batches(ds, store: Store) -> Iterator[dict[str, np.ndarray]]:
    """``ds.iter_batches`` with a shape check on the first batch."""
    r = store.cfg.synth.resolution
    for k, b in enumerate(ds.iter_batches(batch_size=BATCH_SIZE)):
        if k == 0:
            assert b["image"].shape[1:] == (len(store.channels), 1, r, r), b["image"].shape
        yield b


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Exit with every thread's traceback if the block takes longer than ``seconds``.

    A Ray Data pipeline whose tasks cannot be scheduled waits forever (the actor-pool
    design of the pipeline did, when its readers reserved every CPU and its 0.01-CPU
    block-id tasks could not start); a benchmark should fail instead.
    """
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_sdofm(store: Store, cpus: int, warmup: int, repeat: int, timeout: float) -> list[Result]:
    from sdofm.datasets.pipeline import SDOMLPipeline
    from sdofm.datasets.stats import load_or_compute_stats

    t0 = time.perf_counter()
    table = load_or_build_index(store.cfg.data)[0]
    # The statistics job adds a map task (num_cpus=0.25) behind the readers; with the
    # actor-pool readers it could never be scheduled while they held every CPU, so
    # leave it room.
    lc = store.cfg.loader
    stats_cpus = min(lc.cpus_per_reader, (cpus - 0.5) / lc.readers)
    stats_loader = lc.model_copy(update={"cpus_per_reader": stats_cpus})
    d, t = store.cfg.data, store.cfg.transform
    with watchdog(timeout):
        stats = load_or_compute_stats(d, t, stats_loader, table)  # may run a Ray Data job
    pipe = SDOMLPipeline(d, t, lc, table, stats)  # nothing here is timed
    print(
        f"  fpc={store.frames_per_chunk}: pipeline ready in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    out = []

    # (c) streaming: the same Dataset every epoch; each pass is the next epoch's order.
    ds = pipe.dataset("train", subset=store.subset)

    def stream_pass() -> float:
        t0 = time.perf_counter()
        n, ids = consume(ray_batches(ds, store), "image", "sample")
        seconds = time.perf_counter() - t0
        check_delivery(store, "sdofm streaming", n, ids)
        return seconds

    with watchdog(timeout * (warmup + repeat)):
        for _ in range(warmup):
            stream_pass()
        out.append(
            Result(
                store.frames_per_chunk, "(c) sdofm streaming", store.n, fastest(repeat, stream_pass)
            )
        )

    # (d) materialised: read + transform everything into the object store, then iterate it.
    def materialize_pass() -> float:
        t0 = time.perf_counter()
        m = pipe.dataset("train", epoch=0, subset=store.subset).materialize()
        seconds = time.perf_counter() - t0
        assert m.count() == store.n, f"materialised {m.count()} samples, the index has {store.n}"
        materialised.append(m)
        return seconds

    def iterate_pass() -> float:
        t0 = time.perf_counter()
        n, ids = consume(ray_batches(materialised[-1], store), "image", "sample")
        seconds = time.perf_counter() - t0
        check_delivery(store, "sdofm materialised", n, ids)
        return seconds

    materialised: list = []
    with watchdog(timeout * (1 + repeat)):
        seconds = fastest(repeat, materialize_pass)
        materialised[:-1] = []  # keep one copy in the object store
        out.append(Result(store.frames_per_chunk, "(d) sdofm materialize()", store.n, seconds))
        out.append(
            Result(
                store.frames_per_chunk,
                "(d) sdofm iterate materialised",
                store.n,
                fastest(repeat, iterate_pass),
            )
        )
    materialised.clear()  # free the object store before the next store
    return out


# --------------------------------------------------------------------------- report


def print_report(results: list[Result], cpus: int, readers: int, cpus_per_reader: float) -> None:
    header = (
        f"{'store chunking':<16} {'contender':<34} {'samples':>8} {'seconds':>9} {'samples/s':>10}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(r.row())
    print()
    for k in sorted({r.chunking for r in results}):
        rate = {r.contender[:3]: r.rate for r in results if r.chunking == k}
        cb, ca = rate["(c)"] / rate["(b)"], rate["(c)"] / rate["(a)"]
        line = f"{k:>2} frame/chunk: (c)/(b) = {cb:5.2f}x   (c)/(a) = {ca:5.2f}x"
        if k in GOALS:
            gb, ga = GOALS[k]
            ok = "met" if cb >= gb and ca >= ga else "NOT met"
            line += f"   goal on 2 cores: (c)/(b) >= {gb}x, (c)/(a) >= {ga}x ({ok})"
        print(line)
    print(
        f"\nCPUs used by every contender: {cpus} "
        f"(sdofm: loader.readers={readers}, loader.cpus_per_reader={cpus_per_reader})"
    )


def quiet_ray_data() -> None:
    """No progress bars, execution logs or memory advice from Ray Data in the output."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.issue_detectors_config.detectors = []


def load_note(cpus: int) -> str:
    """How busy the machine is before the run: other work makes every timing unreliable.

    The share of all CPUs busy over one second (from ``/proc/stat``, Linux) and the
    1-min load average. Taken before the run, which itself keeps ``cpus`` or more busy.
    """
    load = os.getloadavg()[0]

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait

    try:
        (t0, i0), _, (t1, i1) = ticks(), time.sleep(1.0), ticks()
        busy = 1 - (i1 - i0) / max(t1 - t0, 1)
    except OSError:  # not Linux: the load average only
        busy = min(load / (os.cpu_count() or 1), 1.0)
    note = f"CPUs busy before the run: {busy:.0%} (1-min load average {load:.2f})"
    if busy > 0.15:
        note += " -- the machine is busy with other work, timings are unreliable"
    return note


def machine_note() -> str:
    import ray
    import zarr

    try:  # which sdofm was measured
        here = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        rev = ""
    return (
        f"machine: os.cpu_count()={os.cpu_count()}, usable CPUs={len(os.sched_getaffinity(0))}, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, ray {ray.__version__}, zarr {zarr.__version__}; "
        f"sdofm {rev or '?'} ({Path(sdofm.__file__).parent})"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=2, help="days of synthetic data (default 2)")
    p.add_argument("--resolution", type=int, default=512, help="image size in px (default 512)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs given to every contender (default 2)")
    p.add_argument("--root", default="/tmp/sdofm-bench", help="where the stores are written")
    p.add_argument("--samples", type=int, default=None, help="only the first K train samples")
    p.add_argument("--readers", type=int, default=None, help="sdofm readers (default: --cpus)")
    p.add_argument(
        "--cpus-per-reader",
        type=float,
        default=None,
        help="CPUs reserved per reader (default: cpus / readers)",
    )
    p.add_argument("--block-size", type=int, default=32, help="samples per sdofm read block")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per contender")
    p.add_argument("--repeat", type=int, default=2, help="timed passes; the fastest is reported")
    p.add_argument(
        "--timeout", type=float, default=600, help="seconds per Ray pass before the run aborts"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cpus = args.cpus
    readers = args.readers or cpus
    cpus_per_reader = args.cpus_per_reader or round(cpus / readers, 4)
    load = load_note(cpus)  # before this run adds its own load
    print(machine_note(), flush=True)
    print(load, flush=True)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    stores = [
        prepare(make_config(root, k, args, readers, cpus_per_reader), k, args.samples)
        for k in CHUNKINGS
    ]
    assert len({s.n for s in stores}) == 1, "both stores must give the same samples"
    for s in stores:
        gib = warm_page_cache(s.cfg.data.root) / 2**30
        print(f"page cache: read {gib:.1f} GiB of {s.cfg.data.root}", flush=True)

    results: list[Result] = []
    # (a) and (b) fork worker processes: run them before Ray starts its threads.
    for s in stores:
        results.append(run_limit(s, cpus, args.warmup, args.repeat))
        print(results[-1].row(), flush=True)
        results.append(run_seed(s, cpus, args.warmup, args.repeat))
        print(results[-1].row(), flush=True)

    import ray
    import ray.data

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    try:
        for s in stores:
            results.extend(run_sdofm(s, cpus, args.warmup, args.repeat, args.timeout))
            for r in results[-3:]:
                print(r.row(), flush=True)
    finally:
        ray.shutdown()

    order = {k: i for i, k in enumerate(CHUNKINGS)}
    results.sort(key=lambda r: (order[r.chunking], r.contender[:3]))  # stable: (d) in run order
    print_report(results, cpus, readers, cpus_per_reader)
    print(machine_note())
    print(load)


if __name__ == "__main__":
    main()

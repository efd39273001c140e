"""Ray Data pipeline: index rows -> chunk-aware readers -> model-ready tensors.

Samples (windows of T aligned steps) of a split are grouped into *blocks* of
``loader.block_size`` samples that lie close together in the stores, so that a
block touches few chunks. Each epoch the blocks come in a new order (seeded by
``loader.seed`` and the epoch). A Ray Data read task reads one block: it decodes
only the chunks holding the block's frames, each once, transforms each channel
straight into the output array, shuffles the block's samples and emits

* ``image``: ``(n, C, T, H, W)`` float32 (or float16), physical -> scaled -> z-scored,
* ``time``: ``(n, T)`` int64 ns UTC, ``sample``: ``(n,)`` the sample's id in its split,
* ``deg_cor``: ``(n, C, T)`` the degradation factor divided out (1 for HMI),
* ``eve``: ``(n, L, T)`` when EVE lines are selected.

Frames that are NaN, all zero or unreadable are skipped and counted (or raise,
``loader.on_bad_frame``); nothing non-finite reaches a consumer.

The readers live in Ray's pooled worker processes: each process opens the stores
and parses their headers once and keeps them across epochs. (An ``ActorPoolStrategy``
map stage was the first design; Ray Data starts its actor pool anew for every
execution, which cost ~5 s per epoch here and would re-read hundreds of MB of
headers per epoch on the real archive.)
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sdofm.config import Config
from sdofm.datasets.index import load_or_build_index, make_windows
from sdofm.datasets.sdoml import Archive, FrameError
from sdofm.datasets.transforms import (
    MAGNETOGRAM_CHANNELS,
    Preprocessor,
    default_disk_radius,
    scaling_params,
)

_TRANSIENT = (OSError, TimeoutError, ConnectionError)


# --------------------------------------------------------------------------- plan


@dataclass
class SplitPlan:
    """Which frames each sample of one split needs, and how samples are grouped into blocks."""

    split: str
    windows: np.ndarray  # (n, T) row positions into the index table
    blocks: list[np.ndarray]  # sample ids per block, each in store order
    time: np.ndarray  # (rows,) int64 ns
    year: dict[str, np.ndarray]  # channel -> (rows,) int16
    idx: dict[str, np.ndarray]  # channel -> (rows,) int32
    eve_row: np.ndarray | None  # (rows,) int64

    @property
    def num_samples(self) -> int:
        return len(self.windows)


def plan_split(
    cfg: Config, table: pd.DataFrame, split: str, subset: np.ndarray | None = None
) -> SplitPlan:
    """Windows of ``split`` grouped into blocks of nearby frames.

    Blocks follow the stored order of the first channel (its year, then frame
    index), which keeps each block's reads within a few chunks of every channel:
    the stores keep one day order for all channels.
    """
    d = cfg.data
    windows = make_windows(table, d.num_frames, d.effective_frame_step, split=split)
    if subset is not None:
        windows = windows[np.asarray(subset)]
    first = d.channels[0]
    last = windows[:, -1]
    key = (
        table[f"{first}_year"].to_numpy()[last].astype(np.int64) * 10**8
        + table[f"{first}_idx"].to_numpy()[last]
    )
    order = np.argsort(key, kind="stable")
    n_blocks = max(1, -(-len(order) // cfg.loader.block_size))
    blocks = [b for b in np.array_split(order, n_blocks) if len(b)]
    return SplitPlan(
        split=split,
        windows=windows,
        blocks=blocks,
        time=table["time"].to_numpy(dtype="datetime64[ns]").astype(np.int64),
        year={c: table[f"{c}_year"].to_numpy() for c in d.channels},
        idx={c: table[f"{c}_idx"].to_numpy() for c in d.channels},
        eve_row=table["eve_row"].to_numpy() if d.eve_lines else None,
    )


def make_preprocessor(cfg: Config, stored_size: int, stats: dict | None) -> Preprocessor:
    """The transform chain of ``cfg.transform`` for the selected channels."""
    t = cfg.transform
    channels = tuple(cfg.data.channels)
    methods, lo, hi = (list(v) for v in scaling_params(channels))
    for i, c in enumerate(channels):
        if c in t.scaling:
            methods[i], lo[i], hi[i] = t.scaling[c]
    mean = std = None
    if t.zscore and stats is not None:
        mean = tuple(float(stats["channels"][c]["mean"]) for c in channels)
        std = tuple(float(stats["channels"][c]["std"]) for c in channels)
    out = t.size if t.size and t.size != stored_size else None
    return Preprocessor(
        channels=channels,
        methods=tuple(methods),
        clip_min=tuple(lo),
        clip_max=tuple(hi),
        is_magnetogram=tuple(c in MAGNETOGRAM_CHANNELS for c in channels),
        mean=mean,
        std=std,
        limb=t.limb,
        radius_px=default_disk_radius(out or stored_size),
        out_size=out,
        dtype=t.dtype,
    )


# --------------------------------------------------------------------------- reading


def frame_checks(frames: np.ndarray) -> list[str | None]:
    """Why each frame is unusable: ``(N, H, W) -> N`` reasons or None."""
    # min and max propagate NaN and show inf; an all-zero frame has min == max == 0.
    lo, hi = frames.min(axis=(1, 2)), frames.max(axis=(1, 2))
    out: list[str | None] = [None] * len(frames)
    for i in np.flatnonzero(~(np.isfinite(lo) & np.isfinite(hi))):
        out[i] = "non-finite pixels"
    for i in np.flatnonzero((lo == 0) & (hi == 0)):
        out[i] = "all zero"
    return out


class BlockReader:
    """Reads whole blocks. One per worker process and pipeline: the stores are opened,
    and their headers parsed, once per process and kept across epochs."""

    def __init__(self, cfg: Config, plan: SplitPlan, stats: dict | None):
        self.cfg, self.plan = cfg, plan
        self._buffers: dict[str, np.ndarray] = {}
        self.archive = Archive.open(cfg.data)
        self.stores = {c: self.archive.aia for c in cfg.data.aia_channels}
        self.stores.update({c: self.archive.hmi for c in cfg.data.hmi_channels})
        first = cfg.data.channels[0]
        y0 = str(plan.year[first][plan.windows[0, 0]]) if plan.num_samples else None
        self.stored_size = self.stores[first].array(y0, first).shape[-1] if y0 else 0
        pre = make_preprocessor(cfg, self.stored_size, stats)
        self.size = pre.out_size or self.stored_size
        # One single-channel transform per channel: each channel is read and
        # transformed on its own, straight into the output array.
        self.pre = [pre.channel(i) for i in range(len(cfg.data.channels))]

    def _buffer(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A scratch array kept between blocks: fresh memory costs a page fault per 4 KiB,
        which at 12.6 MB per sample was as slow as decoding it."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
            buf = self._buffers[name] = np.empty(shape, dtype)
        return buf

    def _read(
        self, channel: str, year: int, idx: np.ndarray
    ) -> tuple[np.ndarray, list[str | None]]:
        """Frames ``idx`` (sorted, unique) of one year and channel, with a reason per unusable frame."""
        store = self.stores[channel]
        for attempt in range(self.cfg.loader.read_retries + 1):
            try:
                shape = (len(idx), *store.array(str(year), channel).shape[1:])
                frames = store.read_frames(
                    str(year),
                    channel,
                    idx,
                    check=False,
                    out=self._buffer("frames", shape, np.float32),
                )
                return frames, frame_checks(frames)
            except FrameError as e:
                if isinstance(e.__cause__, _TRANSIENT) and attempt < self.cfg.loader.read_retries:
                    time.sleep(0.2 * 2**attempt)
                    continue
                if self.cfg.loader.on_bad_frame == "raise":
                    raise
                break
        # Find the bad chunk(s): read chunk by chunk, keep what decodes.
        a = store.array(str(year), channel)
        frames = np.zeros((len(idx), *a.shape[1:]), np.float32)
        reasons: list[str | None] = [None] * len(idx)
        for k in np.unique(idx // a.chunks[0]):
            sel = np.flatnonzero(idx // a.chunks[0] == k)
            try:
                frames[sel] = store.read_frames(str(year), channel, idx[sel], check=False)
                for j, why in zip(sel, frame_checks(frames[sel]), strict=True):
                    reasons[j] = why
            except FrameError as e:
                for j in sel:
                    reasons[j] = f"unreadable chunk ({e.reason})"
        return frames, reasons

    def read_block(self, block_id: int, epoch: int) -> tuple[dict[str, np.ndarray], list]:
        """``-> (batch, bad)``: the block's samples and (channel, where, reason) of those skipped."""
        cfg, plan = self.cfg, self.plan
        samples = plan.blocks[block_id]  # in store order: reads stay sequential
        rows = plan.windows[samples]  # (n, T)
        n, T = rows.shape
        # The block's samples leave in a seeded random order: sample j goes to pos[j].
        if cfg.loader.shuffle and plan.split == "train":
            pos = np.argsort(
                np.random.default_rng([cfg.loader.seed, epoch, block_id]).permutation(n)
            )
        else:
            pos = np.arange(n)
        # Ray copies a yielded block into its object store before the reader resumes,
        # so the output array is reused for the next block.
        shape = (n, len(cfg.data.channels), T, self.size, self.size)
        out = self._buffer("out", shape, cfg.transform.dtype)
        deg = np.ones((n, len(cfg.data.channels), T), np.float32)
        bad: dict[int, tuple[str, str, str]] = {}
        for ci, c in enumerate(cfg.data.channels):
            store = self.stores[c]
            years, idxs = plan.year[c][rows], plan.idx[c][rows]
            for y in np.unique(years):
                ni, ti = np.nonzero(years == y)
                uniq, inv = np.unique(idxs[ni, ti], return_inverse=True)
                frames, reasons = self._read(c, int(y), uniq)
                for k in (k for k, why in enumerate(reasons) if why):
                    where = f"{store.url} {y}/{c} frame {uniq[k]}"
                    if cfg.loader.on_bad_frame == "raise":
                        raise FrameError(store.url, str(y), c, int(uniq[k]), reasons[k])
                    for j in ni[inv == k]:
                        bad.setdefault(int(j), (c, where, reasons[k]))
                pre = self.pre[ci]
                # frames is ours: transform it in place unless it must be resized.
                x = pre(frames[None])[0] if pre.out_size else pre.apply_(frames[None])[0]
                dest = pos[ni]
                if len(uniq) == len(ni) and np.array_equal(inv, np.arange(len(inv))):
                    out[dest, ci, ti] = x  # every frame used once: no gather copy
                else:
                    out[dest, ci, ti] = x[inv]
                if store.instrument == "aia":
                    deg[pos[ni], ci, ti] = store.header(str(y), c, "DEG_COR")[uniq][inv]
        sample_ids = np.empty(n, np.int64)
        sample_ids[pos] = samples
        times = np.empty((n, T), np.int64)
        times[pos] = plan.time[rows]
        batch = {"image": out, "time": times, "sample": sample_ids, "deg_cor": deg}
        if plan.eve_row is not None:
            eve_rows = np.empty((n, T), np.int64)
            eve_rows[pos] = plan.eve_row[rows]
            eve = self.archive.eve.read(cfg.data.eve_lines, eve_rows.ravel())  # (n*T, L)
            batch["eve"] = eve.reshape(n, T, -1).transpose(0, 2, 1).copy()
        if bad:
            keep = np.ones(n, bool)
            keep[pos[list(bad)]] = False
            batch = {k: v[keep] for k, v in batch.items()}
        return batch, list(bad.values())


_READERS: dict[str, BlockReader] = {}


def _reader(key: str, cfg: Config, plan_ref, stats: dict | None) -> BlockReader:
    """This process's reader for one pipeline split (created on first use, then reused)."""
    if key not in _READERS:
        import ray

        while len(_READERS) >= 4:  # old pipelines of a long-lived worker
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = BlockReader(cfg, ray.get(plan_ref), stats)
    return _READERS[key]


# --------------------------------------------------------------------------- Ray Data


def _registry_class():
    import ray

    @ray.remote(num_cpus=0)
    class PipelineRegistry:
        """Epoch bookkeeping and bad-frame counts shared by the readers of one dataset."""

        def __init__(self, n_blocks: int, first_epoch: int = 0):
            self.seen = np.full(n_blocks, first_epoch, np.int64)
            self.bad: list[tuple[str, str, str]] = []

        def next_epoch(self, block: int) -> int:
            self.seen[block] += 1
            return int(self.seen[block] - 1)

        def completed(self) -> int:
            return int(self.seen.min()) if len(self.seen) else 0

        def record(self, items: list[tuple[str, str, str]]) -> None:
            self.bad.extend(items)

        def report(self) -> list[tuple[str, str, str]]:
            return list(self.bad)

    return PipelineRegistry


def _read_blocks(key, cfg, plan_ref, stats, registry, blocks, epoch):
    """A read task: read ``blocks`` and yield one Ray Data block each."""
    import ray
    from ray.data.block import BlockAccessor

    reader = _reader(key, cfg, plan_ref, stats)
    handle = ray.get_actor(registry)
    for b in blocks:
        e = epoch if epoch is not None else ray.get(handle.next_epoch.remote(int(b)))
        batch, bad = reader.read_block(int(b), e)
        if bad:
            handle.record.remote(bad)
        yield BlockAccessor.batch_to_block(batch)


def _block_source(
    key, cfg, plan_ref, stats, plan: SplitPlan, shuffle: bool, epoch: int | None, registry: str
):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    n_blocks = len(plan.blocks)
    sizes = np.array([len(b) for b in plan.blocks])
    row_bytes = 4 * len(cfg.data.channels) * cfg.data.num_frames * (cfg.transform.size or 512) ** 2

    class BlockSource(Datasource):
        """The split's blocks, read in a new seeded order each epoch."""

        def estimate_inmemory_data_size(self) -> int:
            return int(sizes.sum() * row_bytes)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            import ray

            e = epoch if epoch is not None else ray.get(ray.get_actor(registry).completed.remote())
            order = (
                np.random.default_rng([cfg.loader.seed, e]).permutation(n_blocks)
                if shuffle
                else np.arange(n_blocks)
            )
            # One block per read task (at most 4096 tasks) so readers work in parallel.
            parts = [p for p in np.array_split(order, min(4096, n_blocks)) if len(p)]
            return [
                ReadTask(
                    (lambda p=p: _read_blocks(key, cfg, plan_ref, stats, registry, p, epoch)),
                    BlockMetadata(
                        num_rows=int(sizes[p].sum()),
                        size_bytes=int(sizes[p].sum() * row_bytes),
                        input_files=None,
                        exec_stats=None,
                    ),
                )
                for p in parts
            ]

    return BlockSource()


class SDOMLPipeline:
    """Datasets for train / val / test built from the alignment index.

    ``stats`` are the normalisation statistics (``sdofm.datasets.stats``); with
    ``transform.zscore`` they are loaded or computed on first use.
    """

    def __init__(self, cfg: Config, table: pd.DataFrame | None = None, stats: dict | None = None):
        self.cfg = cfg
        self.table = table if table is not None else load_or_build_index(cfg.data)[0]
        if stats is None and cfg.transform.zscore:
            from sdofm.datasets.stats import load_or_compute_stats

            stats = load_or_compute_stats(cfg, self.table)
        self.stats = stats
        self._registries: dict[str, object] = {}  # split -> registry actor handle

    def plan(self, split: str, subset: np.ndarray | None = None) -> SplitPlan:
        return plan_split(self.cfg, self.table, split, subset)

    def num_samples(self, split: str) -> int:
        return self.plan(split).num_samples

    def sample_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the ``image`` of one sample."""
        d = self.cfg.data
        first = d.channels[0]
        archive = Archive.open(d)
        store = archive.aia if first in d.aia_channels else archive.hmi
        years = self.table[f"{first}_year"]
        if not len(years):
            raise ValueError(f"the alignment index of {d.root} has no steps")
        stored = store.array(str(years.iloc[0]), first).shape[-1]
        size = self.cfg.transform.size or stored
        return len(d.channels), d.num_frames, size, size

    def dataset(
        self,
        split: str,
        epoch: int | None = None,
        subset: np.ndarray | None = None,
        stats: dict | None = None,
        first_epoch: int = 0,
    ):
        """A Ray Dataset of ``split``.

        ``epoch=None``: every pass over the dataset is the next epoch, counting from
        ``first_epoch`` (the form to hand to ``TorchTrainer(datasets=...)``; a resumed
        run starts at its checkpoint's epoch); an int fixes the order of that epoch.
        """
        import ray

        plan = self.plan(split, subset)
        if plan.num_samples == 0:
            raise ValueError(
                f"split {split!r} has no samples (index {len(self.table)} rows, "
                f"num_frames {self.cfg.data.num_frames})"
            )
        key = uuid.uuid4().hex[:12]
        name = f"sdofm-pipeline-{split}-{key}"
        # The handle keeps the registry alive as long as this pipeline object.
        self._registries[split] = (
            _registry_class().options(name=name).remote(len(plan.blocks), first_epoch)
        )
        lc = self.cfg.loader
        source = _block_source(
            key,
            self.cfg,
            ray.put(plan),
            stats if stats is not None else self.stats,
            plan,
            lc.shuffle and split == "train",
            epoch,
            name,
        )
        ds = ray.data.read_datasource(source, num_cpus=lc.cpus_per_reader, concurrency=lc.readers)
        # Blocks leave in the order planned, whichever reader finishes first: the
        # same seed and epoch give the same sample order.
        ds.context.execution_options.preserve_order = True
        return ds

    def bad_frames(self, split: str) -> list[tuple[str, str, str]]:
        """(channel, where, reason) of every sample skipped so far in ``split``."""
        import ray

        return ray.get(self._registries[split].report.remote())

"""Ray Data pipeline: index rows -> chunk-aware reader actors -> model-ready tensors.

Samples (windows of T aligned steps) of a split are grouped into *blocks* of
``loader.block_size`` samples that lie close together in the stores, so that a
block touches few chunks. Each epoch the blocks come in a new order (seeded by
``loader.seed`` and the epoch), a reader actor (which opened the stores once)
reads a block decoding each chunk once, shuffles the block's samples, applies
the transforms and emits

* ``image``: ``(n, C, T, H, W)`` float32 (or float16), physical -> scaled -> z-scored,
* ``time``: ``(n, T)`` int64 ns UTC, ``sample``: ``(n,)`` the sample's id in its split,
* ``deg_cor``: ``(n, C, T)`` the degradation factor divided out (1 for HMI),
* ``eve``: ``(n, L, T)`` when EVE lines are selected.

Frames that are NaN, all zero or unreadable are skipped and counted (or raise,
``loader.on_bad_frame``); nothing non-finite reaches a consumer.
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


def frame_checks(frames: np.ndarray) -> np.ndarray:
    """Why each frame is unusable: ``(N, H, W) -> (N,)`` object array of str or None."""
    finite = np.isfinite(frames).all(axis=(1, 2))
    nonzero = (frames != 0).any(axis=(1, 2))
    out = np.full(len(frames), None, dtype=object)
    out[~nonzero] = "all zero"
    out[~finite] = "non-finite pixels"
    return out


class BlockReader:
    """Reads whole blocks; one instance per reader actor, stores opened once."""

    def __init__(
        self,
        cfg: Config,
        plan: SplitPlan,
        stats: dict | None,
        registry: str | None,
        epoch: int | None,
    ):
        self.cfg, self.plan, self.registry_name, self.fixed_epoch = cfg, plan, registry, epoch
        self.archive = Archive.open(cfg.data)
        self.stores = {c: self.archive.aia for c in cfg.data.aia_channels}
        self.stores.update({c: self.archive.hmi for c in cfg.data.hmi_channels})
        first = cfg.data.channels[0]
        y0 = str(plan.year[first][plan.windows[0, 0]]) if plan.num_samples else None
        self.stored_size = self.stores[first].array(y0, first).shape[-1] if y0 else 0
        self.pre = make_preprocessor(cfg, self.stored_size, stats)
        self._registry = None

    @property
    def registry(self):
        if self._registry is None and self.registry_name:
            import ray

            self._registry = ray.get_actor(self.registry_name)
        return self._registry

    def _read(
        self, channel: str, year: int, idx: np.ndarray
    ) -> tuple[np.ndarray, list[str | None]]:
        """Frames ``idx`` of one year and channel; unreadable chunks give per-frame reasons."""
        store = self.stores[channel]
        for attempt in range(self.cfg.loader.read_retries + 1):
            try:
                return store.read_frames(str(year), channel, idx, check=False), [None] * len(idx)
            except FrameError as e:
                if isinstance(e.__cause__, _TRANSIENT) and attempt < self.cfg.loader.read_retries:
                    time.sleep(0.2 * 2**attempt)
                    continue
                break
        # Find the bad chunk(s): read chunk by chunk, keep what decodes.
        chunk = store.array(str(year), channel).chunks[0]
        frames = np.zeros((len(idx), *store.array(str(year), channel).shape[1:]), np.float32)
        reasons: list[str | None] = [None] * len(idx)
        for k in np.unique(idx // chunk):
            sel = np.flatnonzero(idx // chunk == k)
            try:
                frames[sel] = store.read_frames(str(year), channel, idx[sel], check=False)
            except FrameError as e:
                if self.cfg.loader.on_bad_frame == "raise":
                    raise
                for j in sel:
                    reasons[j] = f"unreadable chunk ({e.reason})"
        return frames, reasons

    def read_block(self, block_id: int, epoch: int) -> dict[str, np.ndarray]:
        cfg, plan = self.cfg, self.plan
        samples = plan.blocks[block_id]
        if cfg.loader.shuffle and plan.split == "train":
            samples = np.random.default_rng([cfg.loader.seed, epoch, block_id]).permutation(samples)
        rows = plan.windows[samples]  # (n, T)
        n, T = rows.shape
        channels = cfg.data.channels
        cube = np.empty((n, len(channels), T, self.stored_size, self.stored_size), np.float32)
        deg = np.ones((n, len(channels), T), np.float32)
        bad: dict[int, tuple[str, str, str]] = {}  # sample position -> (channel, where, reason)
        for ci, c in enumerate(channels):
            years, idxs = self.plan.year[c][rows], self.plan.idx[c][rows]
            store = self.stores[c]
            for y in np.unique(years):
                ni, ti = np.nonzero(years == y)
                frames, reasons = self._read(c, int(y), idxs[ni, ti])
                checks = frame_checks(frames)
                cube[ni, ci, ti] = frames
                if store.instrument == "aia":
                    deg[ni, ci, ti] = store.header(str(y), c, "DEG_COR")[idxs[ni, ti]]
                for j, why in enumerate(r or ch for r, ch in zip(reasons, checks, strict=True)):
                    if why:
                        where = f"{store.url} {y}/{c} frame {idxs[ni[j], ti[j]]}"
                        if cfg.loader.on_bad_frame == "raise":
                            raise FrameError(store.url, str(y), c, int(idxs[ni[j], ti[j]]), why)
                        bad.setdefault(int(ni[j]), (c, where, why))
        keep = np.array([i not in bad for i in range(n)], bool)
        if bad and self.registry is not None:
            self.registry.record.remote([v for v in bad.values()])
        x = self.pre(cube[keep].transpose(1, 0, 2, 3, 4))  # (C, n, T, H, W)
        out = {
            "image": np.ascontiguousarray(x.transpose(1, 0, 2, 3, 4)),
            "time": plan.time[rows[keep]],
            "sample": samples[keep].astype(np.int64),
            "deg_cor": deg[keep],
        }
        if plan.eve_row is not None:
            eve = self.archive.eve.read(
                cfg.data.eve_lines, plan.eve_row[rows[keep]].ravel()
            )  # (n*T, L)
            out["eve"] = eve.reshape(int(keep.sum()), T, -1).transpose(0, 2, 1).copy()
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        block_id = int(batch["block"][0])
        epoch = int(batch["epoch"][0])
        if epoch < 0:  # an open-ended dataset: this block's own pass count is the epoch
            epoch = (
                self._ray_get(self.registry.next_epoch.remote(block_id))
                if self.registry is not None
                else 0
            )
        return self.read_block(block_id, epoch)

    @staticmethod
    def _ray_get(ref):
        import ray

        return ray.get(ref)


# --------------------------------------------------------------------------- Ray Data


def _registry_class():
    import ray

    @ray.remote(num_cpus=0)
    class PipelineRegistry:
        """Epoch bookkeeping and bad-frame counts shared by the reader actors."""

        def __init__(self, n_blocks: int):
            self.seen = np.zeros(n_blocks, np.int64)
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


def _block_source(n_blocks: int, shuffle: bool, seed: int, epoch: int | None, registry: str):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class BlockSource(Datasource):
        """Block ids in a new seeded order each epoch (the data are read downstream)."""

        def estimate_inmemory_data_size(self) -> int:
            return 16 * n_blocks

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            import pyarrow as pa
            import ray

            e = epoch if epoch is not None else ray.get(ray.get_actor(registry).completed.remote())
            order = (
                np.random.default_rng([seed, e]).permutation(n_blocks)
                if shuffle
                else np.arange(n_blocks)
            )
            tag = -1 if epoch is None else epoch
            # One block per read task (up to 2048 tasks) so reader actors work in parallel.
            parts = np.array_split(order, max(1, min(2048, n_blocks)))

            def make(part):
                return lambda: [
                    pa.table({"block": part.astype(np.int64), "epoch": np.full(len(part), tag)})
                ]

            return [
                ReadTask(
                    make(p),
                    BlockMetadata(
                        num_rows=len(p), size_bytes=16 * len(p), input_files=None, exec_stats=None
                    ),
                )
                for p in parts
                if len(p)
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

    def dataset(
        self,
        split: str,
        epoch: int | None = None,
        subset: np.ndarray | None = None,
        stats: dict | None = None,
    ):
        """A Ray Dataset of ``split``.

        ``epoch=None``: every pass over the dataset is the next epoch (the form to
        hand to ``TorchTrainer(datasets=...)``); an int fixes the order of that epoch.
        """
        import ray
        from ray.data import ActorPoolStrategy

        plan = self.plan(split, subset)
        if plan.num_samples == 0:
            raise ValueError(
                f"split {split!r} has no samples (index {len(self.table)} rows, num_frames {self.cfg.data.num_frames})"
            )
        name = f"sdofm-pipeline-{split}-{uuid.uuid4().hex[:8]}"
        # The handle keeps the registry alive as long as this pipeline object.
        self._registries[split] = _registry_class().options(name=name).remote(len(plan.blocks))
        lc = self.cfg.loader
        shuffle = lc.shuffle and split == "train"
        source = _block_source(len(plan.blocks), shuffle, lc.seed, epoch, name)
        ds = ray.data.read_datasource(source, num_cpus=0.01)
        # Blocks leave in the order planned, whichever reader finishes first: the
        # same seed and epoch give the same sample order.
        ds.context.execution_options.preserve_order = True
        return ds.map_batches(
            BlockReader,
            fn_constructor_kwargs={
                "cfg": self.cfg,
                "plan": plan,
                "stats": stats if stats is not None else self.stats,
                "registry": name,
                "epoch": epoch,
            },
            batch_size=1,
            compute=ActorPoolStrategy(size=min(lc.readers, len(plan.blocks))),
            num_cpus=lc.cpus_per_reader,
        )

    def bad_frames(self, split: str) -> list[tuple[str, str, str]]:
        """(channel, where, reason) of every sample skipped so far in ``split``."""
        import ray

        return ray.get(self._registries[split].report.remote())

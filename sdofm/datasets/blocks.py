"""Read plans and the block reader: index rows -> model-ready arrays, in plain numpy (no Ray).

Samples (windows of T aligned steps) of a split are grouped into *blocks* of
``loader.block_size`` samples that lie close together in the stores, so that a
block touches few chunks. :class:`BlockReader` reads one block: it decodes only
the chunks holding the block's frames, each once, transforms each channel
straight into the output array, shuffles the block's samples and returns

* ``image``: ``(n, C, T, H, W)`` float32 (or float16), physical -> scaled -> z-scored (with
  ``transform.on: device`` physical units, see :mod:`sdofm.datasets.device`),
* ``time``: ``(n, T)`` int64 ns UTC, ``sample``: ``(n,)`` the sample's id in its split,
* ``deg_cor``: ``(n, C, T)`` the degradation factor divided out (1 for HMI),
* ``eve``: ``(n, L, T)`` when EVE lines are selected.

Frames that are NaN, all zero or unreadable (after ``loader.read_retries``) are
skipped, the samples that use them dropped, and each returned as a
:class:`SkippedFrame` (or they raise, ``loader.on_bad_frame``); nothing non-finite
reaches a consumer. The Ray Data source that runs readers in parallel, and gathers
the skipped frames into one :class:`SkipReport`, is :mod:`sdofm.datasets.pipeline`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sdofm.config import DataConfig, LoaderConfig, TransformConfig
from sdofm.constants import disk_radius_px
from sdofm.datasets.index import make_windows
from sdofm.datasets.sdoml import Archive, FrameError, ReadPolicy
from sdofm.datasets.transforms import (
    MAGNETOGRAM_CHANNELS,
    Preprocessor,
    cast_into,
    downsample_to,
    scaled_clip,
    scaling_params,
    wire_exponents,
)

# --------------------------------------------------------------------------- skipped frames


@dataclass(frozen=True)
class SkippedFrame:
    """One frame that could not be used, and the samples (ids in their split) it cost."""

    store: str
    year: str
    channel: str
    frame: int
    reason: str
    split: str = ""
    samples: tuple[int, ...] = ()

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.store, self.year, self.channel, self.frame)

    def error(self) -> FrameError:
        return FrameError(self.store, self.year, self.channel, self.frame, self.reason)


@dataclass
class SkipReport:
    """Distinct skipped frames and distinct lost samples per split, however often (epochs,
    readers, samples sharing a frame) each was met."""

    frames: dict[tuple[str, str, str, int], str] = field(default_factory=dict)  # key -> reason
    samples: dict[str, set[int]] = field(default_factory=dict)  # split -> sample ids

    def add(self, skipped: Iterable[SkippedFrame]) -> SkipReport:
        for s in skipped:
            self.frames.setdefault(s.key, s.reason)
            self.samples.setdefault(s.split, set()).update(s.samples)
        return self

    def merge(self, other: SkipReport) -> SkipReport:
        for k, why in other.frames.items():
            self.frames.setdefault(k, why)
        for split, ids in other.samples.items():
            self.samples.setdefault(split, set()).update(ids)
        return self

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def num_samples(self, split: str | None = None) -> int:
        """Distinct samples lost (in ``split``, or summed over the splits)."""
        if split is not None:
            return len(self.samples.get(split, ()))
        return sum(len(v) for v in self.samples.values())

    def rows(self) -> list[dict]:
        """One row per frame, sorted: store, year, channel, frame, reason."""
        return [
            {"store": st, "year": y, "channel": c, "frame": f, "reason": why}
            for (st, y, c, f), why in sorted(self.frames.items())
        ]

    def summary(self) -> str:
        """One line: how many frames and samples were skipped."""
        per = ", ".join(f"{len(v)} {k}" for k, v in sorted(self.samples.items()) if v)
        return (
            f"{self.num_frames} unusable frame(s) skipped; {self.num_samples()} sample(s) "
            f"left out ({per or 'none'})"
        )

    def __bool__(self) -> bool:
        return bool(self.frames)


# --------------------------------------------------------------------------- plan


@dataclass
class SplitPlan:
    """Which frames each sample of one split needs, and how samples are grouped into blocks."""

    split: str
    windows: np.ndarray  # (n, T) row positions into the index table
    ids: np.ndarray  # (n,) each sample's id in the whole split (``subset`` or 0..n-1)
    blocks: list[np.ndarray]  # sample ids per block, each in store order
    time: np.ndarray  # (rows,) int64 ns
    year: dict[str, np.ndarray]  # channel -> (rows,) int16
    idx: dict[str, np.ndarray]  # channel -> (rows,) int32
    deg_cor: dict[str, np.ndarray]  # channel -> (rows,) float32, from the index: no header reads
    eve_row: np.ndarray | None  # (rows,) int64

    @property
    def num_samples(self) -> int:
        return len(self.windows)


def plan_split(
    data: DataConfig,
    loader: LoaderConfig,
    table: pd.DataFrame,
    split: str,
    subset: np.ndarray | None = None,
) -> SplitPlan:
    """Windows of ``split`` (optionally only the sample ids ``subset``) grouped into blocks
    of ``loader.block_size`` nearby samples.

    Blocks follow the stored order of the first channel (its year, then frame
    index), which keeps each block's reads within a few chunks of every channel:
    the stores keep one day order for all channels.
    """
    windows = make_windows(table, data.num_frames, data.effective_frame_step, split=split)
    ids = np.arange(len(windows))
    if subset is not None:
        windows, ids = windows[np.asarray(subset)], ids[np.asarray(subset)]
    first = data.channels[0]
    last = windows[:, -1]
    key = (
        table[f"{first}_year"].to_numpy()[last].astype(np.int64) * 10**8
        + table[f"{first}_idx"].to_numpy()[last]
    )
    order = np.argsort(key, kind="stable")
    # Whole blocks of block_size (the last one shorter): with a block size that is a
    # multiple of the batch size, batches are slices of one block, never concatenations.
    size = loader.block_size
    blocks = [order[i : i + size] for i in range(0, len(order), size)]
    return SplitPlan(
        split=split,
        windows=windows,
        ids=ids,
        blocks=blocks,
        time=table["time"].to_numpy(dtype="datetime64[ns]").astype(np.int64),
        year={c: table[f"{c}_year"].to_numpy() for c in data.channels},
        idx={c: table[f"{c}_idx"].to_numpy() for c in data.channels},
        deg_cor={c: table[f"{c}_deg"].to_numpy(np.float32) for c in data.channels},
        eve_row=table["eve_row"].to_numpy() if data.eve_lines else None,
    )


# --------------------------------------------------------------------------- transforms


def make_preprocessor(
    channels: Sequence[str], transform: TransformConfig, stored_size: int, stats: dict | None
) -> Preprocessor:
    """The transform chain of ``transform`` for ``channels`` of frames stored at ``stored_size`` px.

    The z-score uses ``stats`` (``sdofm.datasets.stats``) when ``transform.zscore``
    and they are given, except for magnetograms with ``transform.magnetogram: fixed``:
    those are divided by their scaled clip value; frames are area-averaged to
    ``transform.size`` when it differs.
    """
    t = transform
    channels = tuple(channels)
    methods, lo, hi, soft = (list(v) for v in scaling_params(channels))
    for i, c in enumerate(channels):
        if c in t.scaling:
            methods[i], lo[i], hi[i] = t.scaling[c]
    mean = std = None
    if t.zscore and stats is not None:
        mean, std = [], []
        for i, c in enumerate(channels):
            if c in MAGNETOGRAM_CHANNELS and t.magnetogram == "fixed":
                # One physical scale for every period: the clipped field, scaled, in [-1, 1].
                mean.append(0.0)
                std.append(scaled_clip(methods[i], lo[i], hi[i], soft[i]))
            else:
                mean.append(float(stats["channels"][c]["mean"]))
                std.append(float(stats["channels"][c]["std"]))
        mean, std = tuple(mean), tuple(std)
    out = t.size if t.size and t.size != stored_size else None
    return Preprocessor(
        channels=channels,
        methods=tuple(methods),
        clip_min=tuple(lo),
        clip_max=tuple(hi),
        is_magnetogram=tuple(c in MAGNETOGRAM_CHANNELS for c in channels),
        softening=tuple(soft),
        mean=mean,
        std=std,
        limb=t.limb,
        radius_px=disk_radius_px(out or stored_size),
        out_size=out,
        dtype=t.dtype,
    )


def physical_transform(transform: TransformConfig, channels: Sequence[str]) -> TransformConfig:
    """``transform`` that keeps physical units: linear with no clip for every channel,
    no z-score, float32 (resizing and limb handling unchanged)."""
    return transform.model_copy(
        update={
            "scaling": {c: ("linear", None, None) for c in channels},
            "zscore": False,
            "dtype": "float32",
        }
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
    """Reads whole blocks of one split's ``plan``. The stores are opened once per reader
    and no header is read: frame positions and ``DEG_COR`` come with the plan. The Ray
    Data source keeps one reader per worker process and pipeline, across epochs."""

    def __init__(
        self,
        data: DataConfig,
        transform: TransformConfig,
        loader: LoaderConfig,
        plan: SplitPlan,
        stats: dict | None,
    ):
        self.data, self.transform, self.loader, self.plan = data, transform, loader, plan
        self._buffers: dict[str, np.ndarray] = {}
        policy = ReadPolicy(loader.read_retries, loader.read_timeout, loader.read_backoff)
        self.archive = Archive.open(data, read_policy=policy)
        # channel -> (year, first frame, frames, reasons): see _read_continuing.
        self._tails: dict[str, tuple[int, int, np.ndarray, list]] = {}
        self.stores = {c: self.archive.aia for c in data.aia_channels}
        self.stores.update({c: self.archive.hmi for c in data.hmi_channels})
        first = data.channels[0]
        y0 = str(plan.year[first][plan.windows[0, 0]]) if plan.num_samples else None
        self.stored_size = self.stores[first].array(y0, first).shape[-1] if y0 else 0
        pre = make_preprocessor(data.channels, transform, self.stored_size, stats)
        self.size = pre.out_size or self.stored_size
        # transform.on == "device": decode (and resize) only, physical units out (float16:
        # clipped to each channel's bounds and scaled by a power of two, see
        # transforms.wire_exponents); the engine applies the rest (sdofm.datasets.device).
        self.decode_only = transform.on == "device"
        self.out_dtype = transform.dtype
        self.wire = None
        if self.decode_only and transform.dtype == "float16":
            k = wire_exponents(pre.channels, pre.clip_min, pre.clip_max)
            self.wire = [
                (lo, hi, 2.0**-e) for lo, hi, e in zip(pre.clip_min, pre.clip_max, k, strict=True)
            ]
        # One single-channel transform per channel: each channel is read and
        # transformed on its own, straight into the output array.
        self.pre = [pre.channel(i) for i in range(len(data.channels))]

    def _buffer(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A scratch array kept between blocks: fresh memory costs a page fault per 4 KiB,
        which at 12.6 MB per sample was as slow as decoding it."""
        buf = self._buffers.get(name)
        # Leading rows of a larger buffer are as contiguous as a buffer of their own.
        if (
            buf is None
            or buf.shape[1:] != tuple(shape[1:])
            or len(buf) < shape[0]
            or buf.dtype != np.dtype(dtype)
        ):
            buf = self._buffers[name] = np.empty(shape, dtype)
        return buf[: shape[0]]

    def _read_continuing(
        self, channel: str, year: int, idx: np.ndarray
    ) -> tuple[np.ndarray, list[str | None]]:
        """``_read`` for blocks read in store order: the chunk two neighbouring blocks share
        is decoded once.

        A read task reads ``loader.blocks_per_read`` consecutive blocks, so the last chunk
        a block touches is mostly the next block's first. That chunk is decoded whole
        anyway: its frames from the block's last on are kept (the tail) and the next
        block takes what it needs of them from there. With blocks of 32 samples and
        15-frame chunks this saves about a quarter of the decoding.
        """
        a = self.stores[channel].array(str(year), channel)
        k = a.chunks[0]
        if k == 1:
            return self._read(channel, year, idx)
        n_hit, tail = 0, self._tails.get(channel)
        if tail is not None and tail[0] == year and len(idx) and idx[0] >= tail[1]:
            first, t_frames, t_reasons = tail[1:]
            n_hit = int(np.searchsorted(idx, first + len(t_frames)))
        fresh = idx[n_hit:]
        req = fresh
        if len(fresh):  # the rest of the last chunk rides along: the next block's tail
            last = int(fresh[-1])
            end = min((last // k + 1) * k, a.shape[0])
            req = np.concatenate([fresh, np.arange(last + 1, end)])
        shape = (n_hit + len(req), *a.shape[1:])
        buf = self._buffer("frames", shape, np.float32)
        reasons: list[str | None] = []
        if n_hit:
            buf[:n_hit] = t_frames[idx[:n_hit] - first]
            reasons = [t_reasons[i - first] for i in idx[:n_hit]]
        if len(req):
            frames, why = self._read(channel, year, req, out=buf[n_hit:])
            if not np.may_share_memory(frames, buf):  # read chunk by chunk after an error
                buf[n_hit:] = frames
            reasons += why
            j = n_hit + len(fresh) - 1
            self._tails[channel] = (year, last, buf[j:].copy(), reasons[j:])
        return buf[: len(idx)], reasons[: len(idx)]

    def _read(
        self, channel: str, year: int, idx: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str | None]]:
        """Frames ``idx`` (sorted, unique) of one year and channel, with a reason per unusable
        frame. The store retries failed chunk reads; a chunk still unreadable costs its frames
        (or raises, with ``on_bad_frame=raise``). ``out``: where to put them (default: a
        scratch buffer)."""
        store = self.stores[channel]
        errors = None if self.loader.on_bad_frame == "raise" else {}
        shape = (len(idx), *store.array(str(year), channel).shape[1:])
        frames = store.read_frames(
            str(year),
            channel,
            idx,
            check=False,
            out=self._buffer("frames", shape, np.float32) if out is None else out,
            errors=errors,
        )
        reasons = frame_checks(frames)
        if errors:  # unreadable: NaN in frames, the reason here
            for j in np.flatnonzero(np.isin(idx, list(errors))):
                reasons[j] = errors[int(idx[j])]
        return frames, reasons

    def read_block(
        self, block_id: int, epoch: int
    ) -> tuple[dict[str, np.ndarray], list[SkippedFrame]]:
        """``-> (batch, skipped)``: the block's usable samples, and each unusable frame with
        the samples (ids in the split) dropped because of it.

        ``image`` may be the buffer the next call writes into: copy it to keep it.
        """
        data, lc, plan = self.data, self.loader, self.plan
        samples = plan.blocks[block_id]  # in store order: reads stay sequential
        rows = plan.windows[samples]  # (n, T)
        n, T = rows.shape
        # The block's samples leave in a seeded random order: sample j goes to pos[j].
        if lc.shuffle and plan.split == "train":
            pos = np.argsort(np.random.default_rng([lc.seed, epoch, block_id]).permutation(n))
        else:
            pos = np.arange(n)
        # Ray copies a yielded block into its object store before the reader resumes,
        # so the output array is reused for the next block.
        shape = (n, len(data.channels), T, self.size, self.size)
        out = self._buffer("out", shape, self.out_dtype)
        deg = np.ones((n, len(data.channels), T), np.float32)
        skipped: list[SkippedFrame] = []
        dropped: set[int] = set()  # positions in the block
        for ci, c in enumerate(data.channels):
            store = self.stores[c]
            years, idxs = plan.year[c][rows], plan.idx[c][rows]
            for y in np.unique(years):
                ni, ti = np.nonzero(years == y)
                uniq, inv = np.unique(idxs[ni, ti], return_inverse=True)
                frames, reasons = self._read_continuing(c, int(y), uniq)
                for k in (k for k, why in enumerate(reasons) if why):
                    if lc.on_bad_frame == "raise":
                        raise FrameError(store.url, str(y), c, int(uniq[k]), reasons[k])
                    users = sorted({int(j) for j in ni[inv == k]})
                    dropped.update(users)
                    ids = tuple(int(i) for i in plan.ids[samples[users]])
                    skipped.append(
                        SkippedFrame(
                            store.url, str(y), c, int(uniq[k]), reasons[k], plan.split, ids
                        )
                    )
                pre = self.pre[ci]
                # frames is ours: transform it in place unless it must be resized.
                if self.decode_only:
                    x = downsample_to(frames, self.size) if pre.out_size else frames
                    if self.wire is not None:
                        lo, hi, scale = self.wire[ci]
                        np.multiply(np.clip(x, lo, hi, out=x), scale, out=x)
                else:
                    x = pre(frames[None])[0] if pre.out_size else pre.apply_(frames[None])[0]
                if x.dtype != out.dtype:  # float16 images: torch's cast, 80x numpy's
                    x = cast_into(self._buffer("cast", x.shape, out.dtype), x)
                dest = pos[ni]
                if len(uniq) == len(ni) and np.array_equal(inv, np.arange(len(inv))):
                    out[dest, ci, ti] = x  # every frame used once: no gather copy
                else:
                    out[dest, ci, ti] = x[inv]
                deg[pos[ni], ci, ti] = plan.deg_cor[c][rows[ni, ti]]
        sample_ids = np.empty(n, np.int64)
        sample_ids[pos] = samples
        times = np.empty((n, T), np.int64)
        times[pos] = plan.time[rows]
        batch = {"image": out, "time": times, "sample": sample_ids, "deg_cor": deg}
        if plan.eve_row is not None:
            eve_rows = np.empty((n, T), np.int64)
            eve_rows[pos] = plan.eve_row[rows]
            eve = self.archive.eve.read(data.eve_lines, eve_rows.ravel())  # (n*T, L)
            batch["eve"] = eve.reshape(n, T, -1).transpose(0, 2, 1).copy()
        if dropped:
            keep = np.ones(n, bool)
            keep[pos[sorted(dropped)]] = False
            batch = {k: v[keep] for k, v in batch.items()}
        return batch, skipped

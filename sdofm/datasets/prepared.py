"""Prepared shards: model-ready samples written once, read at memory speed.

``sdofm data prepare`` runs the streaming readers (:class:`~sdofm.datasets.blocks.BlockReader`,
transforms on the readers) once over each split as a Ray Data job and writes what they
emit, so that a training run only reads bytes: no decoding, no scaling, no z-score.
With ``data.prepared`` set, :class:`~sdofm.datasets.pipeline.SDOMLPipeline` reads the
shards instead of the stores and hands over the same batches (keys, sample ids,
times, ``deg_cor``, ``eve``; the image within the stored dtype's rounding).

Layout under the output folder or URL::

    manifest.json          settings, fingerprints, stats, shape, dtype; "complete" last
    train/00000.bin        images (n, C, T, H, W), raw little-endian float16 / bfloat16
    train/00000.npz        the shard's sample ids, times, deg_cor, eve, skipped frames and
                           fingerprint; written after the .bin: it commits the shard
    train/index.npz        every sample of the split: id, shard, row, time, deg_cor, eve

A block is read with one ranged GET of the ``.bin`` and ``np.frombuffer``. The stored
dtype (``prepare.dtype``): float16 by default. z-scored values (a few units, a flare's
peak some tens) and scaled values (log10 of counts, asinh of the field) lie far
inside float16's range (65504) and it keeps 11 significant bits (relative error
<= 2**-11), against bfloat16's 8 (2**-8); bfloat16 is offered for unscaled physical
units, which can exceed float16's range. numpy has no bfloat16: it is stored as the
upper 16 bits of the float32 (rounded to nearest even) and read back by shifting them
into place. A value that does not fit the dtype is an error naming shard and channel.

Resuming: shard k of a split always holds the same samples (the split's samples in
store order, ``prepare.shard_samples`` at a time). A shard counts as written when its
``.npz`` exists with the job's fingerprint; a re-run writes only the others, and
refuses a folder prepared from other data, transform, statistics or shard settings,
naming what differs. Consumers refuse a folder whose manifest is not ``complete``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdofm.config import ConfigError, DataConfig, LoaderConfig, TransformConfig, dump_config
from sdofm.datasets.index import INDEX_KEYS
from sdofm.datasets.transforms import cast_into
from sdofm.storage import open_url

FORMAT = 1
MANIFEST = "manifest.json"
DATA_KEYS = (*INDEX_KEYS, "num_frames", "frame_step")
TRANSFORM_KEYS = ("size", "limb", "scaling", "zscore", "magnetogram", "stats_samples", "stats_seed")


def settings(data: DataConfig, transform: TransformConfig) -> dict:
    """The settings prepared samples depend on, as ``section.key -> value``."""
    d, t = dump_config(data), dump_config(transform)
    return {
        **{f"data.{k}": d[k] for k in DATA_KEYS},
        **{f"transform.{k}": t[k] for k in TRANSFORM_KEYS},
    }


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stats_fingerprint(stats: dict | None) -> str | None:
    if stats is None:
        return None
    return digest({c: (s["mean"], s["std"]) for c, s in stats["channels"].items()})


def differences(old: dict, new: dict) -> list[str]:
    return [
        f"{k}: prepared {old.get(k)!r}, asked {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


# --------------------------------------------------------------------------- dtypes


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored dtype (bfloat16 as uint16, rounded to nearest even)."""
    if dtype == "float16":
        return cast_into(np.empty(x.shape, "<f2"), x)
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def decode(
    raw: np.ndarray, dtype: str, out: str = "float32", into: np.ndarray | None = None
) -> np.ndarray:
    """The stored dtype -> ``out`` (float32 or float16), written ``into`` an array if given
    (torch's cast: :func:`~sdofm.datasets.transforms.cast_into`)."""
    import torch

    dst = np.empty(raw.shape, out) if into is None else into
    src = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16))
    return cast_into(dst, src.view(torch.float16 if dtype == "float16" else torch.bfloat16))


def _storage_dtype(dtype: str) -> np.dtype:
    return np.dtype("<f2" if dtype == "float16" else "<u2")


# --------------------------------------------------------------------------- reading


@dataclass
class PreparedPlan:
    """The samples of one split held by prepared shards, in blocks that each lie in one
    shard (the streaming :class:`~sdofm.datasets.blocks.SplitPlan`'s counterpart)."""

    split: str
    ids: np.ndarray  # (n,) the sample ids asked for (a subset, or the split's windows)
    blocks: list[np.ndarray]  # positions into the arrays below, per block
    shard: np.ndarray  # (m,) per prepared sample
    row: np.ndarray
    sample: np.ndarray
    time: np.ndarray
    deg_cor: np.ndarray
    eve: np.ndarray | None

    @property
    def num_samples(self) -> int:
        return len(self.ids)


class PreparedSet:
    """An opened, complete prepared folder and what it holds."""

    def __init__(self, url: str, storage_options: dict):
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = open_url(url, storage_options)
        path = f"{self.root}/{MANIFEST}"
        try:
            self.manifest = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            raise ConfigError(
                f"data.prepared: {self.url} holds no {MANIFEST}: write it with "
                "`sdofm data prepare CONFIG URL`"
            ) from None
        if not self.manifest.get("complete"):
            raise ConfigError(
                f"data.prepared: {self.url} was not prepared to the end (interrupted?): "
                "run `sdofm data prepare` with the same config and URL again to finish it"
            )
        self.dtype = self.manifest["dtype"]
        self.shape = tuple(self.manifest["sample_shape"])  # (C, T, H, W)

    def check(self, data: DataConfig, transform: TransformConfig) -> None:
        """Error naming every setting that differs between the shards and the config."""
        differ = differences(self.manifest["settings"], settings(data, transform))
        if differ:
            raise ConfigError(
                f"data.prepared: {self.url} was prepared with other settings than this "
                f"config asks for: {'; '.join(differ)}. Prepare it again for this config "
                "(another URL), or unset data.prepared to read the stores"
            )

    def stats(self) -> dict | None:
        return self.manifest["stats"]

    def plan(self, split: str, block_size: int, subset: np.ndarray | None = None) -> PreparedPlan:
        info = self.manifest["splits"].get(split)
        if info is None:
            raise ConfigError(
                f"data.prepared: {self.url} holds no {split!r} split (prepared: "
                f"{', '.join(self.manifest['splits'])}); add it to prepare.splits and prepare again"
            )
        ids = np.arange(info["windows"]) if subset is None else np.asarray(subset)
        if info["samples"]:
            z = np.load(io.BytesIO(self.fs.cat_file(f"{self.root}/{split}/index.npz")))
            idx = {k: z[k] for k in z.files}
        else:
            idx = {"sample": np.zeros(0, np.int64), "shard": np.zeros(0, np.int64)}
            idx["row"], idx["time"], idx["deg_cor"] = idx["shard"], idx["shard"], idx["shard"]
        if subset is not None:
            idx = {k: v[np.isin(idx["sample"], ids)] for k, v in idx.items()}
            # As the streaming plan: a subset's samples are numbered by their position in it.
            order = np.argsort(ids, kind="stable")
            idx["sample"] = order[np.searchsorted(ids[order], idx["sample"])]
        blocks = []
        shard = idx["shard"]
        for s in np.unique(shard):
            pos = np.flatnonzero(shard == s)
            blocks += [pos[i : i + block_size] for i in range(0, len(pos), block_size)]
        return PreparedPlan(
            split,
            ids,
            blocks,
            shard,
            idx["row"],
            idx["sample"],
            idx["time"],
            idx["deg_cor"],
            idx.get("eve"),
        )


class PreparedReader:
    """Reads blocks of a :class:`PreparedPlan`: one ranged read of a shard's image file
    each, no decoding. The counterpart of :class:`~sdofm.datasets.blocks.BlockReader`
    (same ``read_block``), kept per worker process by the Ray Data source."""

    def __init__(self, data: DataConfig, transform: TransformConfig, loader: LoaderConfig, plan):
        self.loader, self.plan = loader, plan
        self.prepared = PreparedSet(data.prepared, data.storage_options)
        self.out_dtype = transform.dtype
        self.raw = _storage_dtype(self.prepared.dtype)
        self.sample_bytes = int(np.prod(self.prepared.shape)) * self.raw.itemsize
        self.local = "file" in self.prepared.fs.protocol
        self._buffers: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A scratch array kept between blocks (fresh memory costs a page fault per 4 KiB)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1:] != tuple(shape[1:]) or len(buf) < shape[0]:
            buf = self._buffers[name] = np.empty(shape, dtype)
        return buf[: shape[0]]

    def read_block(self, block_id: int, epoch: int) -> tuple[dict[str, np.ndarray], list]:
        """As ``BlockReader.read_block``: ``image`` is the buffer the next call writes into."""
        p, lc, ps = self.plan, self.loader, self.prepared
        pos = p.blocks[block_id]
        if lc.shuffle and p.split == "train":  # as BlockReader: seeded by seed, epoch, block
            pos = pos[np.random.default_rng([lc.seed, epoch, block_id]).permutation(len(pos))]
        rows = p.row[pos]
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        path = f"{ps.root}/{p.split}/{int(p.shard[pos[0]]):05d}.bin"
        raw = self._buffer("raw", (r1 - r0, *ps.shape), self.raw)
        start, size = r0 * self.sample_bytes, (r1 - r0) * self.sample_bytes
        if self.local:  # straight into the buffer
            with ps.fs.open(path, "rb") as f:
                f.seek(start)
                got = f.readinto(raw.reshape(-1).view(np.uint8))
        else:  # one ranged GET
            data = ps.fs.cat_file(path, start=start, end=start + size)
            got = len(data)
            raw.reshape(-1).view(np.uint8)[:got] = np.frombuffer(data, np.uint8)
        if got != size:
            raise OSError(f"{ps.url}: {path} is shorter than its index says (damaged shard?)")
        image = self._buffer("image", (len(pos), *ps.shape), self.out_dtype)
        for j, r in enumerate(rows - r0):
            decode(raw[r], ps.dtype, self.out_dtype, into=image[j])
        batch = {
            "image": image,
            "time": p.time[pos],
            "sample": p.sample[pos],
            "deg_cor": p.deg_cor[pos],
        }
        if p.eve is not None:
            batch["eve"] = p.eve[pos]
        return batch, []

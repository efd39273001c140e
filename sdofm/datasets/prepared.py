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

import datetime as dt
import hashlib
import io
import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from sdofm.config import Config, ConfigError, DataConfig, LoaderConfig, TransformConfig, dump_config
from sdofm.datasets.index import INDEX_KEYS
from sdofm.storage import join, listdir, open_url, read_bytes, write_atomic

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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stats_fingerprint(stats: dict | None) -> str | None:
    if stats is None:
        return None
    return _digest({c: (s["mean"], s["std"]) for c, s in stats["channels"].items()})


def _differences(old: dict, new: dict) -> list[str]:
    return [
        f"{k}: prepared {old.get(k)!r}, asked {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


# --------------------------------------------------------------------------- dtypes


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored dtype (bfloat16 as uint16, rounded to nearest even)."""
    if dtype == "float16":
        return x.astype("<f2")
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def decode(
    raw: np.ndarray, dtype: str, out: str = "float32", into: np.ndarray | None = None
) -> np.ndarray:
    """The stored dtype -> ``out`` (float32 or float16), written ``into`` an array if given.

    torch casts (one thread, vectorised): numpy's float16 -> float32 cast ran at about a
    fifth of torch's speed here, as slow as the codec decodes.
    """
    import torch

    dst = np.empty(raw.shape, out) if into is None else into
    src = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16))
    src = src.view(torch.float16 if dtype == "float16" else torch.bfloat16)
    # One thread: readers are the parallelism, and an OpenMP pool inherited through a
    # fork (a process pool) would hang in a parallel copy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.from_numpy(dst).copy_(src)
    finally:
        torch.set_num_threads(threads)
    return dst


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
        differ = _differences(self.manifest["settings"], settings(data, transform))
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


# --------------------------------------------------------------------------- writing


@dataclass
class PrepareReport:
    """What a prepare run did."""

    url: str
    written: dict[str, int] = field(default_factory=dict)  # split -> shards written now
    kept: dict[str, int] = field(default_factory=dict)  # split -> shards already there
    samples: dict[str, int] = field(default_factory=dict)  # split -> samples held
    skipped: list[dict] = field(default_factory=list)  # unusable frames (each once)
    seconds: float = 0.0


def _shard_meta(root: str, split: str, k: int) -> str:
    return join(root, split, f"{k:05d}.npz")


def _write_shards(batch: dict, job: dict) -> dict:
    """A Ray Data task: read the samples of each shard in ``batch`` and write the shard."""
    import ray

    from sdofm.datasets.pipeline import _reader, _ReadSpec

    fs, root = open_url(job["url"], job["storage_options"])
    out = {"split": [], "shard": [], "samples": []}
    for split, k in zip(batch["split"], batch["shard"], strict=True):
        k = int(k)
        spec = _ReadSpec(
            f"{job['key']}-{split}",
            job["data"],
            job["transform"],
            job["loader"],
            job["plans"][split],
            job["stats"],
            registry="",
        )
        reader = _reader(spec)
        parts, skipped = [], []
        b0, b1 = ray.get(job["shard_blocks"][split])[k]
        for b in range(b0, b1):
            got, why = reader.read_block(b, 0)
            x = encode(got["image"], job["dtype"])  # a new array: the reader reuses its buffer
            finite = np.isfinite(decode(x, job["dtype"]))
            if not finite.all():
                bad = np.flatnonzero(~finite.all(axis=(0, 2, 3, 4)))
                names = [job["data"].channels[i] for i in bad]
                raise ValueError(
                    f"prepare: shard {k} of {split} has values of channel(s) {names} that do "
                    f"not fit {job['dtype']} (largest {np.abs(got['image']).max():.4g}): use "
                    "prepare.dtype=bfloat16, or scale these channels"
                )
            parts.append({**{k_: v.copy() for k_, v in got.items() if k_ != "image"}, "image": x})
            skipped += [
                {
                    "store": s.store,
                    "year": s.year,
                    "channel": s.channel,
                    "frame": s.frame,
                    "reason": s.reason,
                    "samples": list(s.samples),
                }
                for s in why
            ]
        cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        write_atomic(fs, f"{root}/{split}/{k:05d}.bin", cat.pop("image").tobytes())
        meta = io.BytesIO()
        np.savez(meta, fingerprint=job["fingerprint"], skipped=json.dumps(skipped), **cat)
        write_atomic(fs, _shard_meta(root, split, k), meta.getvalue())  # commits the shard
        out["split"].append(split)
        out["shard"].append(k)
        out["samples"].append(len(cat["sample"]))
    return {k: np.array(v) for k, v in out.items()}


def _committed(
    url: str, storage_options: dict, split: str, n_shards: int, fingerprint: str
) -> dict[int, dict]:
    """The shards of ``split`` under ``url`` already written by a job of this fingerprint:
    k -> meta."""
    try:
        names = set(listdir(join(url, split), storage_options))
    except FileNotFoundError:
        return {}
    out = {}
    for k in range(n_shards):
        if f"{k:05d}.npz" in names and f"{k:05d}.bin" in names:
            raw = read_bytes(_shard_meta(url, split, k), storage_options)
            z = np.load(io.BytesIO(raw))
            if str(z["fingerprint"]) == fingerprint:
                out[k] = {key: z[key] for key in z.files}
    return out


def prepare(cfg: Config, out: str, progress=None) -> PrepareReport:
    """Write ``cfg``'s splits as prepared shards to ``out`` (a folder or fsspec URL), with
    Ray Data readers spread over the cluster; resume what an earlier run left."""
    import time

    import ray

    from sdofm.datasets.blocks import plan_split
    from sdofm.datasets.index import index_key, load_or_build_index
    from sdofm.datasets.pipeline import SDOMLPipeline
    from sdofm.datasets.stats import load_or_compute_stats

    t0 = time.perf_counter()
    d, pc = cfg.data.model_copy(update={"prepared": None}), cfg.prepare
    table, _ = load_or_build_index(d)
    stats = (
        load_or_compute_stats(d, cfg.transform, cfg.loader, table) if cfg.transform.zscore else None
    )
    transform = cfg.transform.model_copy(update={"on": "reader", "dtype": "float32"})
    loader = cfg.loader.model_copy(update={"shuffle": False})
    shape = SDOMLPipeline(d, transform, loader, table, stats).sample_shape()
    job_settings = {
        **settings(d, cfg.transform),
        "index_key": index_key(d),
        "index_fingerprint": str(int(pd.util.hash_pandas_object(table, index=False).sum())),
        "stats_fingerprint": _stats_fingerprint(stats),
        "prepare.dtype": pc.dtype,
        "prepare.shard_samples": pc.shard_samples,
        "format": FORMAT,
    }
    fingerprint = _digest(job_settings)
    fs, root = open_url(out, d.storage_options)
    mpath = f"{root}/{MANIFEST}"
    old = json.loads(fs.cat_file(mpath)) if fs.exists(mpath) else None
    if old is not None and old.get("fingerprint") != fingerprint:
        differ = _differences(old.get("job", {}), job_settings)
        raise ConfigError(
            f"{out} holds shards prepared with other settings ({'; '.join(differ)}): "
            "prepare to another URL, or delete this one"
        )
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "job": job_settings,
        "settings": settings(d, cfg.transform),
        "dtype": pc.dtype,
        "sample_shape": list(shape),
        "channels": list(d.channels),
        "eve_lines": list(d.eve_lines),
        "stats": None if stats is None else {k: v for k, v in stats.items() if k != "path"},
        "complete": False,
    }
    fs.makedirs(root, exist_ok=True)
    write_atomic(fs, mpath, json.dumps(manifest, indent=1).encode())

    report = PrepareReport(out)
    plans, shard_blocks, todo, metas, windows = {}, {}, [], {}, {}
    for split in pc.splits:
        plan = plan_split(d, loader, table, split)
        windows[split] = plan.num_samples
        order = np.concatenate(plan.blocks) if plan.blocks else np.zeros(0, np.int64)
        shards = [order[i : i + pc.shard_samples] for i in range(0, len(order), pc.shard_samples)]
        # Each shard's samples in blocks of its own (store order): a shard is one read job.
        blocks, ranges = [], []
        for s in shards:
            b0 = len(blocks)
            blocks += [s[i : i + loader.block_size] for i in range(0, len(s), loader.block_size)]
            ranges.append((b0, len(blocks)))
        plans[split] = ray.put(replace(plan, blocks=blocks))
        shard_blocks[split] = ray.put(ranges)
        metas[split] = _committed(out, d.storage_options, split, len(shards), fingerprint)
        report.kept[split] = len(metas[split])
        todo += [{"split": split, "shard": k} for k in range(len(shards)) if k not in metas[split]]
        fs.makedirs(f"{root}/{split}", exist_ok=True)
    for split in pc.splits:
        report.written[split] = 0
    if todo:
        job = {
            "key": uuid.uuid4().hex[:12],
            "url": out,
            "storage_options": d.storage_options,
            "data": d,
            "transform": transform,
            "loader": loader,
            "plans": plans,
            "shard_blocks": shard_blocks,
            "stats": stats,
            "fingerprint": fingerprint,
            "dtype": pc.dtype,
        }
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _write_shards,
            fn_kwargs={"job": job},
            batch_size=1,
            num_cpus=cfg.loader.cpus_per_reader,
            concurrency=cfg.loader.readers,
        )
        done = 0
        for row in ds.iter_rows():
            split, k = str(row["split"]), int(row["shard"])
            z = np.load(io.BytesIO(fs.cat_file(_shard_meta(root, split, k))))
            metas[split][k] = {key: z[key] for key in z.files}
            report.written[split] += 1
            done += 1
            if progress:
                progress(done, len(todo))

    splits = {}
    seen: dict[tuple, dict] = {}
    for split in pc.splits:
        ks = sorted(metas[split])
        n = sum(len(metas[split][k]["sample"]) for k in ks)
        splits[split] = {"windows": windows[split], "samples": n, "shards": len(ks)}
        report.samples[split] = n
        for k in ks:
            for s in json.loads(str(metas[split][k]["skipped"])):
                key = (s["store"], s["year"], s["channel"], s["frame"])
                entry = seen.setdefault(key, {**s, "samples": {}})
                entry["samples"].setdefault(split, set()).update(s["samples"])
        if not n:
            continue
        idx = {
            "sample": np.concatenate([metas[split][k]["sample"] for k in ks]),
            "shard": np.concatenate([np.full(len(metas[split][k]["sample"]), k) for k in ks]),
            "row": np.concatenate([np.arange(len(metas[split][k]["sample"])) for k in ks]),
            "time": np.concatenate([metas[split][k]["time"] for k in ks]),
            "deg_cor": np.concatenate([metas[split][k]["deg_cor"] for k in ks]),
        }
        if d.eve_lines:
            idx["eve"] = np.concatenate([metas[split][k]["eve"] for k in ks])
        buf = io.BytesIO()
        np.savez(buf, **idx)
        write_atomic(fs, f"{root}/{split}/index.npz", buf.getvalue())
    report.skipped = [
        {**s, "samples": {k: sorted(v) for k, v in s["samples"].items()}}
        for _, s in sorted(seen.items())
    ]
    # Splits an earlier run of the same settings prepared stay part of the folder.
    kept = {k: v for k, v in (old or {}).get("splits", {}).items() if k not in splits}
    kept_skips = [
        {**s, "samples": {k: v for k, v in s["samples"].items() if k in kept}}
        for s in (old or {}).get("skipped", [])
        if set(s["samples"]) & set(kept)
    ]
    manifest.update(
        splits={**kept, **splits},
        skipped=report.skipped + kept_skips,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        complete=True,
    )
    write_atomic(fs, mpath, json.dumps(manifest, indent=1).encode())  # last: the folder is usable
    report.seconds = time.perf_counter() - t0
    return report

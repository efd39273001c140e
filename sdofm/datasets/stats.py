"""Per-channel normalisation statistics of the scaled values, over the train split, with Ray Data.

Each reader batch is reduced where it was read (samples, count, sum, sum of
squares, min, max and a fixed-range histogram per channel); the driver only adds
the partial results. The samples counted are the samples used: those with an
unusable frame are skipped, and the statistics name the skipped frames. Percentiles come from the histogram (4096 bins spanning the
channel's clip range in scaled units, so their resolution is 1/4096 of it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import numpy as np
import pandas as pd

from sdofm.config import ConfigError, DataConfig, LoaderConfig, TransformConfig, dump_config
from sdofm.datasets.blocks import make_preprocessor
from sdofm.datasets.cache import cache_file
from sdofm.datasets.index import index_key
from sdofm.datasets.pipeline import SDOMLPipeline
from sdofm.datasets.prepared import MANIFEST, PreparedSet
from sdofm.datasets.transforms import Preprocessor, scaling_params
from sdofm.storage import read_json, write_json

N_BINS = 4096
PERCENTILES = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)


def scaled_ranges(pre: Preprocessor) -> np.ndarray:
    """``(C, 2)`` range of each channel's scaled values (from its clip values)."""
    out = np.zeros((len(pre.channels), 2))
    soft = pre.softening or (1.0,) * len(pre.channels)
    for i, (m, lo, hi) in enumerate(zip(pre.methods, pre.clip_min, pre.clip_max, strict=True)):
        lo = -1e4 if lo is None else lo
        hi = 1e4 if hi is None else hi
        f = {
            "log": np.log10,
            "sqrt": lambda v: np.sqrt(max(v, 0.0)),
            "asinh": lambda v, s=soft[i]: np.arcsinh(v / s),
            "linear": float,
        }[m]
        out[i] = f(lo), f(hi)
    return out


def partial_stats(batch: dict[str, np.ndarray], ranges: np.ndarray) -> dict[str, np.ndarray]:
    """Reduce images ``(n, C, T, H, W)`` to the sample count and per-channel count, sums,
    extremes and a histogram (one row)."""
    x = batch["image"]
    c = x.shape[1]
    row = {k: np.zeros(c) for k in ("sum", "sumsq")}
    row["min"], row["max"] = np.full(c, np.inf), np.full(c, -np.inf)
    row["count"] = np.zeros(c, np.int64)
    row["hist"] = np.zeros((c, N_BINS), np.int64)
    row["samples"] = np.array(len(x), np.int64)
    # One channel at a time: a float64 copy of a whole block is GBs. (A block may have
    # lost all its samples to bad frames.)
    for i in range(c if len(x) else 0):
        v = np.ascontiguousarray(x[:, i]).ravel().astype(np.float64)
        row["count"][i], row["sum"][i], row["sumsq"][i] = v.size, v.sum(), np.dot(v, v)
        row["min"][i], row["max"][i] = v.min(), v.max()
        row["hist"][i] = np.histogram(v, bins=N_BINS, range=tuple(ranges[i]))[0]
    return {k: a[None] for k, a in row.items()}


def combine(parts: list[dict[str, np.ndarray]], channels: list[str], ranges: np.ndarray) -> dict:
    """Add partial results into the statistics of each channel."""

    def get(k: str) -> np.ndarray:  # (parts, C[, bins])
        return np.stack([np.asarray(p[k]) for p in parts])

    count, s, sq = get("count").sum(0), get("sum").sum(0), get("sumsq").sum(0)
    hist = get("hist").sum(0)
    mn, mx = get("min").min(0), get("max").max(0)
    out = {}
    for i, c in enumerate(channels):
        mean = s[i] / count[i]
        std = float(np.sqrt(max(sq[i] / count[i] - mean * mean, 0.0)))
        edges = np.linspace(*ranges[i], N_BINS + 1)
        cdf = np.cumsum(hist[i]) / max(hist[i].sum(), 1)
        pct = {
            f"{p:g}": float(np.interp(p / 100, np.concatenate([[0], cdf]), edges))
            for p in PERCENTILES
        }
        out[c] = {
            "count": int(count[i]),
            "mean": float(mean),
            "std": std,
            "min": float(mn[i]),
            "max": float(mx[i]),
            "percentiles": pct,
        }
    return out


def stats_provenance(data: DataConfig, transform: TransformConfig, table: pd.DataFrame) -> dict:
    """What the statistics depend on: the index, the channels and the transform settings."""
    t = dump_config(transform)
    return {
        "index_key": index_key(data),
        "index_fingerprint": str(int(pd.util.hash_pandas_object(table, index=False).sum())),
        "channels": list(data.channels),
        "num_frames": data.num_frames,
        "transform": {k: t[k] for k in ("size", "limb", "scaling", "stats_samples", "stats_seed")},
        # the default scaling of each channel too: a change of it invalidates the statistics
        "defaults": [list(v) for v in scaling_params(data.channels)],
        "split": "train",
    }


def stats_path(cache_dir: str, provenance: dict) -> str:
    """The statistics file for ``provenance`` in ``cache_dir`` (a local path or a URL)."""
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:12]
    return cache_file(cache_dir, f"stats-{key}.json")


def compute_stats(
    data: DataConfig, transform: TransformConfig, loader: LoaderConfig, table: pd.DataFrame
) -> dict:
    """Statistics of the scaled (not z-scored) values over the train split (or a seeded subsample)."""
    raw = transform.model_copy(update={"zscore": False, "on": "reader"})
    pipe = SDOMLPipeline(data, raw, loader, table=table)
    n = pipe.num_samples("train")
    if n == 0:
        raise ConfigError(
            "the train split is empty, so no normalisation statistics can be computed: "
            "check data.split (val/test months or fractions), data.start/end and data.num_frames"
        )
    subset = None
    if n > transform.stats_samples:
        subset = np.sort(
            np.random.default_rng(transform.stats_seed).choice(
                n, transform.stats_samples, replace=False
            )
        )
    ranges = scaled_ranges(make_preprocessor(data.channels, raw, 0, None))
    ds = pipe.dataset("train", epoch=0, subset=subset)
    with pipe.frame_errors():
        parts = ds.map_batches(
            partial_stats, fn_kwargs={"ranges": ranges}, batch_size=None, num_cpus=0.25
        ).take_all()
    skipped = pipe.skipped("train")
    return {
        "channels": combine(parts, list(data.channels), ranges),
        "samples": int(sum(int(p["samples"]) for p in parts)),  # those used
        "skipped": {"samples": skipped.num_samples("train"), "frames": skipped.rows()},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def load_or_compute_stats(
    data: DataConfig,
    transform: TransformConfig,
    loader: LoaderConfig,
    table: pd.DataFrame,
    recompute: bool = False,
) -> dict:
    """The statistics for ``data`` and ``transform``: reused while the index and transform
    settings match (cached in ``data.cache_dir``), else computed with Ray Data."""
    prov = stats_provenance(data, transform, table)
    if data.prepared:
        return _prepared_stats(data, transform, prov, recompute)
    path = stats_path(data.cache_dir, prov)
    found = None
    if not recompute:
        try:
            found = read_json(path)
        except FileNotFoundError:
            pass
    if found is not None and found.get("provenance") == prov:
        return {**found, "path": path}
    stats = {**compute_stats(data, transform, loader, table), "provenance": prov}
    write_json(path, stats)
    stats["path"] = path
    return stats


def _prepared_stats(
    data: DataConfig, transform: TransformConfig, prov: dict, recompute: bool
) -> dict:
    """The statistics prepared shards were z-scored with (they travel in the manifest): the
    z-scored shards cannot give statistics of their own that would not be these."""

    ps = PreparedSet(data.prepared, data.storage_options)
    ps.check(data, transform)
    stats = ps.stats()
    where = f"{ps.url}/{MANIFEST}"
    if recompute:
        raise ConfigError(
            f"data.prepared: the shards of {ps.url} are z-scored with the statistics in "
            f"{where}; to recompute statistics, read the stores (unset data.prepared)"
        )
    if stats is None:
        raise ConfigError(
            f"data.prepared: {ps.url} was prepared without z-score, so it holds no statistics"
        )
    if stats.get("provenance") != prov:
        raise ConfigError(
            f"data.prepared: the statistics in {where} were computed for another index or "
            "transform than this config's: prepare the shards again"
        )
    return {**stats, "path": where}

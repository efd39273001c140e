"""Cross-instrument time alignment: one row per step of a cadence grid.

For every selected channel the row holds the (year, frame index) of the frame
nearest to the grid time within the tolerance, plus the EVE row when EVE lines
are selected. Steps that miss a required channel are dropped and counted by
reason. Each row is labelled train / val / test, and :func:`make_windows` turns
rows into windows of T steps contiguous in time.

The table is written to parquet (atomically) with its provenance in the file's
metadata and reused while the stores' fingerprints and the settings match.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import sdofm
from sdofm.config import DataConfig, dump_config, month_of
from sdofm.datasets.cache import cache_file
from sdofm.datasets.sdoml import Archive, ImageStore, LayoutError
from sdofm.storage import read_bytes, write_bytes

INDEX_FORMAT = 2  # 2: DEG_COR of each AIA frame in the table
_META_KEY = b"sdofm"
_NS = 1_000_000_000
SPLITS = ("train", "val", "test")


@dataclass
class IndexReport:
    """What building (or reusing) the index did."""

    path: str
    reused: bool
    n_grid: int
    n_rows: int
    splits: dict[str, int]
    dropped: dict[str, int]
    bad_headers: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _to_ns(t: dt.datetime) -> int:
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC).replace(tzinfo=None)
    return int(np.datetime64(t, "ns").astype(np.int64))


def _year_of(ns: int) -> int:
    return int(np.datetime64(ns, "ns").astype("datetime64[Y]").astype(int)) + 1970


@dataclass
class _ChannelFrames:
    """All usable frames of one channel across years, sorted by time."""

    times: np.ndarray  # (N,) int64 ns
    year: np.ndarray  # (N,) int16
    index: np.ndarray  # (N,) int32
    deg_cor: np.ndarray  # (N,) float32, 1 where the store records none (HMI)


def _channel_frames(
    store: ImageStore,
    channel: str,
    years: list[str],
    cfg: DataConfig,
    bad: dict,
    examples: list[str],
) -> _ChannelFrames:
    times, year_col, idx_col, deg_col = [], [], [], []
    for year in years:
        ft = store.frame_times(year, channel)
        for reason, frames in ft.problems.items():
            bad.setdefault(channel, Counter())[reason] += len(frames)
            for i in frames[:2]:
                examples.append(f"{store.url} {year}/{channel} frame {i}: {reason}")
            if cfg.on_bad_header == "raise" and frames:
                raw = store.raw_header(year, channel).t_obs
                value = raw[frames[0]] if frames[0] < len(raw) else "<no entry>"
                raise LayoutError(
                    f"{store.url} {year}/{channel} frame {frames[0]}: {reason} (T_OBS = {value!r}); "
                    f"{len(frames)} frame(s) affected. Set data.on_bad_header=skip to skip and count them."
                )
        ok = ~np.isnat(ft.times)
        n = int(ok.sum())
        times.append(ft.times[ok].astype(np.int64))
        year_col.append(np.full(n, int(year), dtype=np.int16))
        idx_col.append(np.flatnonzero(ok).astype(np.int32))
        deg_col.append(_deg_cor(store, year, channel)[ok])
    t = np.concatenate(times) if times else np.zeros(0, np.int64)
    order = np.argsort(t, kind="stable")
    return _ChannelFrames(
        t[order],
        np.concatenate(year_col)[order] if year_col else np.zeros(0, np.int16),
        np.concatenate(idx_col)[order] if idx_col else np.zeros(0, np.int32),
        np.concatenate(deg_col)[order] if deg_col else np.zeros(0, np.float32),
    )


def _deg_cor(store: ImageStore, year: str, channel: str) -> np.ndarray:
    """``(N,) float32`` degradation factor of each frame: readers take it from the table, so
    that no reader downloads a header. 1 where none is recorded (HMI, nulls)."""
    n = store.array(year, channel).shape[0]
    if store.instrument != "aia" or "DEG_COR" not in store.raw_header(year, channel).numbers:
        return np.ones(n, np.float32)
    return np.nan_to_num(store.header(year, channel, "DEG_COR"), nan=1.0).astype(np.float32)


def nearest(
    times: np.ndarray, grid: np.ndarray, tolerance_ns: int
) -> tuple[np.ndarray, np.ndarray]:
    """Position in sorted ``times`` nearest to each ``grid`` time, and whether it is within tolerance.

    ``times: (N,) int64, grid: (G,) int64 -> (pos: (G,) int64, ok: (G,) bool)``;
    a tie goes to the earlier frame.
    """
    if len(times) == 0:
        return np.zeros(len(grid), np.int64), np.zeros(len(grid), bool)
    right = np.searchsorted(times, grid, side="left").clip(0, len(times) - 1)
    left = (right - 1).clip(0, None)
    d_left = np.abs(grid - times[left])
    d_right = np.abs(times[right] - grid)
    pos = np.where(d_left <= d_right, left, right)
    return pos, np.abs(times[pos] - grid) <= tolerance_ns


def assign_splits(grid: np.ndarray, split) -> np.ndarray:
    """Label each grid time ``(G,) int64 ns -> (G,) <U5`` as train / val / test."""
    labels = np.full(len(grid), "train", dtype="<U5")
    if split.method == "month":
        months = grid.astype("datetime64[ns]").astype("datetime64[M]").astype(int)
        year, month = months // 12 + 1970, months % 12 + 1
        for label, entries in (("val", split.val_months), ("test", split.test_months)):
            for y, m in map(month_of, entries):
                labels[(month == m) & ((year == y) if y is not None else True)] = label
        return labels
    block_ns = int(split.block.total_seconds() * _NS)
    block = (grid - grid.min()) // block_ns if len(grid) else grid
    n_blocks = int(block.max()) + 1 if len(grid) else 0
    rng = np.random.default_rng(split.seed)
    perm = rng.permutation(n_blocks)
    n_val = round(split.val_fraction * n_blocks)
    n_test = round(split.test_fraction * n_blocks)
    if n_blocks >= 3:  # a split asked for gets at least one block
        n_val = max(n_val, 1 if split.val_fraction > 0 else 0)
        n_test = max(n_test, 1 if split.test_fraction > 0 else 0)
    kind = np.full(n_blocks, "train", dtype="<U5")
    kind[perm[:n_val]] = "val"
    kind[perm[n_val : n_val + n_test]] = "test"
    return kind[block] if len(grid) else labels


def buffer_mask(grid: np.ndarray, labels: np.ndarray, buffer_ns: int) -> np.ndarray:
    """True for grid times within ``buffer_ns`` of a change of split label (they are dropped)."""
    if buffer_ns <= 0 or len(grid) < 2:
        return np.zeros(len(grid), bool)
    change = np.flatnonzero(labels[1:] != labels[:-1])
    edges = (grid[change] + grid[change + 1]) // 2  # the boundary lies between the two steps
    if len(edges) == 0:
        return np.zeros(len(grid), bool)
    pos = np.searchsorted(edges, grid).clip(0, len(edges) - 1)
    d = np.minimum(np.abs(grid - edges[pos]), np.abs(grid - edges[(pos - 1).clip(0)]))
    return d < buffer_ns


# --------------------------------------------------------------------------- build


INDEX_KEYS = (
    "root",
    "aia_store",
    "hmi_store",
    "eve_store",
    "aia_channels",
    "hmi_channels",
    "eve_lines",
    "start",
    "end",
    "cadence",
    "tolerance",
    "split",
    "on_bad_header",
)
"""The ``data`` settings the alignment index depends on."""


def index_key(cfg: DataConfig) -> str:
    """A digest of the settings the index depends on (its file name)."""
    d = dump_config(cfg)
    return hashlib.sha256(
        json.dumps({k: d[k] for k in INDEX_KEYS}, sort_keys=True).encode()
    ).hexdigest()[:12]


def index_path(cfg: DataConfig) -> str:
    """The index file for ``cfg`` in ``data.cache_dir`` (a local path or a URL)."""
    return cache_file(cfg.cache_dir, f"index-{index_key(cfg)}.parquet")


def fingerprints(archive: Archive, cfg: DataConfig) -> dict[str, str]:
    """Digests of the stores' object metadata over the indexed years (no header is read)."""
    out = {}
    if archive.aia is not None and cfg.aia_channels:
        out["aia"] = archive.aia.fingerprint(
            cfg.aia_channels, archive.aia.years_between(cfg.start, cfg.end)
        )
    if archive.hmi is not None and cfg.hmi_channels:
        out["hmi"] = archive.hmi.fingerprint(
            cfg.hmi_channels, archive.hmi.years_between(cfg.start, cfg.end)
        )
    if archive.eve is not None and cfg.eve_lines:
        out["eve"] = archive.eve.fingerprint()
    return out


def build_index(
    cfg: DataConfig,
    archive: Archive | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Align the selected channels on the cadence grid. Returns ``(table, provenance)``."""
    archive = archive or Archive.open(cfg)
    selected: list[tuple[ImageStore, str]] = []
    if cfg.aia_channels:
        selected += [(archive.aia, c) for c in cfg.aia_channels]
    if cfg.hmi_channels:
        selected += [(archive.hmi, c) for c in cfg.hmi_channels]

    start_ns = _to_ns(cfg.start) if cfg.start else None
    end_ns = _to_ns(cfg.end) if cfg.end else None
    stores = list(dict.fromkeys(s for s, _ in selected))
    years: dict[str, list[str]] = {}
    for store in stores:
        years[store.url] = store.years_between(cfg.start, cfg.end)
        store.validate([c for s, c in selected if s is store], years[store.url])

    bad: dict[str, Counter] = {}
    examples: list[str] = []
    frames: dict[str, _ChannelFrames] = {}
    for k, (store, c) in enumerate(selected):
        frames[c] = _channel_frames(store, c, years[store.url], cfg, bad, examples)
        if progress:
            progress(k + 1, len(selected))

    cadence_ns = int(cfg.cadence.total_seconds() * _NS)
    tol_ns = int(cfg.effective_tolerance.total_seconds() * _NS)
    nonempty = [f.times for f in frames.values() if len(f.times)]
    if not nonempty:
        raise LayoutError(
            f"no usable frames in {', '.join(s.url for s in stores)} for the selected channels"
        )
    lo = start_ns if start_ns is not None else min(t[0] for t in nonempty)
    hi = end_ns if end_ns is not None else max(t[-1] for t in nonempty)
    lo = (
        -(-lo // cadence_ns) * cadence_ns
        if start_ns is not None
        else (lo // cadence_ns) * cadence_ns
    )
    grid = np.arange(lo, hi + 1, cadence_ns, dtype=np.int64)

    dropped: Counter = Counter()
    keep = np.ones(len(grid), bool)
    any_data = np.zeros(len(grid), bool)
    cols: dict[str, np.ndarray] = {}
    for c, f in frames.items():
        pos, ok = nearest(f.times, grid, tol_ns)
        any_data |= ok
        cols[f"{c}_year"] = f.year[pos] if len(f.times) else np.zeros(len(grid), np.int16)
        cols[f"{c}_idx"] = f.index[pos] if len(f.times) else np.zeros(len(grid), np.int32)
        cols[f"{c}_deg"] = f.deg_cor[pos] if len(f.times) else np.ones(len(grid), np.float32)
        cols[f"{c}_dt"] = (
            ((f.times[pos] - grid) / _NS).astype(np.float32)
            if len(f.times)
            else np.zeros(len(grid), np.float32)
        )
        keep &= ok
        cols[f"_ok_{c}"] = ok
    for c in frames:
        dropped[f"missing {c}"] += int((~cols.pop(f"_ok_{c}") & any_data).sum())
    dropped["no data at all"] += int((~any_data).sum())

    if cfg.eve_lines:
        eve = archive.eve
        eve.validate(cfg.eve_lines)
        et = eve.times()
        valid = ~np.isnat(et)
        eve_rows = np.flatnonzero(valid)
        et_ns = et[valid].astype(np.int64)
        order = np.argsort(et_ns, kind="stable")
        pos, ok = nearest(et_ns[order], grid, tol_ns)
        row = eve_rows[order][pos] if len(et_ns) else np.zeros(len(grid), np.int64)
        dropped["missing EVE"] += int((~ok & keep).sum())
        keep &= ok
        # EVE marks missing data with negative values: a step needs at least one valid
        # selected line (whole-spectrum gaps are dropped); single missing lines stay as
        # stored, and consumers mask them (the virtual EVE loss does).
        want = np.flatnonzero(keep)
        values = eve.read(cfg.eve_lines, np.unique(row[want])) if len(want) else np.zeros((0, 1))
        lookup = {r: i for i, r in enumerate(np.unique(row[want]))}
        ok_vals = (values > 0).any(axis=1) if len(want) else np.zeros(0, bool)
        good = np.zeros(len(grid), bool)
        good[want] = ok_vals[[lookup[r] for r in row[want]]] if len(want) else False
        dropped["EVE spectrum missing (-1)"] += int((keep & ~good).sum())
        keep &= good
        cols["eve_row"] = row.astype(np.int64)

    labels = assign_splits(grid, cfg.split)
    buffered = buffer_mask(grid, labels, int(cfg.split.buffer.total_seconds() * _NS))
    dropped["split buffer"] += int((buffered & keep).sum())
    keep &= ~buffered

    table = pd.DataFrame({"time": pd.to_datetime(grid[keep], unit="ns", utc=True)})
    table["split"] = pd.Categorical(labels[keep], categories=list(SPLITS))
    for name, col in cols.items():
        table[name] = col[keep]
    provenance = {
        "format": INDEX_FORMAT,
        "sdofm_version": sdofm.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "stores": {
            k: getattr(archive, k).url
            for k in ("aia", "hmi", "eve")
            if getattr(archive, k) is not None
        },
        "fingerprints": fingerprints(archive, cfg),
        "channels": [c for _, c in selected],
        "eve_lines": list(cfg.eve_lines),
        "cadence": dump_config(cfg)["cadence"],
        "tolerance_s": cfg.effective_tolerance.total_seconds(),
        "split": dump_config(cfg.split),
        "n_grid": int(len(grid)),
        "n_rows": int(keep.sum()),
        "splits": {s: int((labels[keep] == s).sum()) for s in SPLITS},
        "dropped": {k: v for k, v in dropped.items() if v},
        "bad_headers": {c: dict(v) for c, v in bad.items()},
        "examples": examples[:20],
    }
    return table, provenance


def write_index(table: pd.DataFrame, provenance: dict, path: str | Path) -> None:
    """Write the table with its provenance; readers never see a half-written file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = {**(arrow.schema.metadata or {}), _META_KEY: json.dumps(provenance).encode()}
    buf = pa.BufferOutputStream()
    pq.write_table(arrow.replace_schema_metadata(meta), buf)
    write_bytes(path, buf.getvalue().to_pybytes())


def read_index(path: str | Path) -> tuple[pd.DataFrame, dict] | None:
    """The index table and its provenance (None when there is no file at ``path``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = read_bytes(path)
    except FileNotFoundError:
        return None
    t = pq.read_table(pa.BufferReader(data))
    prov = json.loads((t.schema.metadata or {}).get(_META_KEY, b"{}"))
    return t.to_pandas(), prov


def load_or_build_index(
    cfg: DataConfig, rebuild: bool = False, progress: Callable[[int, int], None] | None = None
) -> tuple[pd.DataFrame, IndexReport]:
    """The current index for ``cfg``: reused if its stores are unchanged, rebuilt otherwise."""
    path = index_path(cfg)
    archive = Archive.open(cfg)
    found = None if rebuild else read_index(path)
    if found is not None:
        table, prov = found
        if prov.get("format") == INDEX_FORMAT and prov.get("fingerprints") == fingerprints(
            archive, cfg
        ):
            return table, _report(path, prov, reused=True)
    table, prov = build_index(cfg, archive, progress)
    write_index(table, prov, path)
    return table, _report(path, prov, reused=False)


def _report(path: str, prov: dict, reused: bool) -> IndexReport:
    return IndexReport(
        path=str(path),
        reused=reused,
        n_grid=prov["n_grid"],
        n_rows=prov["n_rows"],
        splits=prov["splits"],
        dropped=prov["dropped"],
        bad_headers=prov["bad_headers"],
        examples=prov["examples"],
    )


# --------------------------------------------------------------------------- windows


def make_windows(
    table: pd.DataFrame, num_frames: int, frame_step: dt.timedelta, split: str | None = None
) -> np.ndarray:
    """Rows forming windows of ``num_frames`` steps ``frame_step`` apart, all in one split.

    ``-> (n_windows, num_frames) int64`` row positions into ``table`` (sorted by
    time), oldest frame first; each window ends at one row.
    """
    times = table["time"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    labels = table["split"].astype(str).to_numpy()
    last = np.arange(len(table)) if split is None else np.flatnonzero(labels == split)
    step = int(frame_step.total_seconds() * _NS)
    rows = [last]
    ok = np.ones(len(last), bool)
    for k in range(1, num_frames):
        want = times[last] - k * step
        pos = np.searchsorted(times, want).clip(0, max(len(times) - 1, 0))
        ok &= (times[pos] == want) & (labels[pos] == labels[last])
        rows.append(pos)
    return np.stack(rows[::-1], axis=1)[ok]


def forecast_windows(
    table: pd.DataFrame, inputs: int, leads: int, step: dt.timedelta, split: str | None = None
) -> tuple[np.ndarray, int]:
    """Forecasting samples: ``inputs`` frames at ``t - (inputs - 1) step .. t`` and targets at
    ``t + step .. t + leads step``, every one an index row (each channel within the index's
    tolerance of the grid) of one split.

    ``-> (windows (n, inputs + leads) row positions, oldest first: the inputs then the
    targets; dropped)``, ``dropped`` the rows of the split (as the last input, ``t``) that
    have no complete window, a gap in the inputs or the targets, or the split's edge.
    """
    windows = make_windows(table, inputs + leads, step, split=split)
    return windows, dropped_windows(table, len(windows), split)


def dropped_windows(table: pd.DataFrame, windows: int, split: str | None = None) -> int:
    """Rows of ``split`` (all rows for None) that end no complete window, given that
    ``windows`` windows were found there (each ends on its own row)."""
    labels = table["split"].astype(str).to_numpy()
    anchors = len(table) if split is None else int((labels == split).sum())
    return anchors - windows

"""What ``sdofm data info`` reports of an archive: per store, year and channel the frame
count, shape, chunking, codec, time span, cadence, gaps and unusable headers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdofm.datasets.sdoml.stores import Archive, EVEStore, ImageStore


def _codec(a) -> str:
    comp = getattr(a.metadata, "compressor", None)
    if comp is None:
        return "none"
    cfg = comp.get_config() if hasattr(comp, "get_config") else {}
    shuffle = {0: "no shuffle", 1: "byte shuffle", 2: "bit-shuffle"}.get(cfg.get("shuffle"), "")
    return " ".join(
        str(x)
        for x in (cfg.get("id", comp), cfg.get("cname", ""), cfg.get("clevel", ""), shuffle)
        if x != ""
    )


def describe_image_store(
    store: ImageStore, gap_factor: float = 1.5, years: Sequence[str] | None = None
) -> dict:
    """What an AIA/HMI store holds: per year (of ``years``, default all) and channel the
    frame count, span and gaps.

    A gap is a spacing between consecutive frames over ``gap_factor`` times the
    channel's median spacing.
    """
    out: dict[str, Any] = {"url": store.url, "instrument": store.instrument.upper(), "years": {}}
    for year in [y for y in store.years if years is None or y in years]:
        rows = {}
        for c in store.channels(year):
            a = store.array(year, c)
            ft = store.frame_times(year, c)
            t = np.sort(ft.times[~np.isnat(ft.times)])
            d = (
                np.diff(t).astype("timedelta64[s]").astype(np.int64)
                if len(t) > 1
                else np.zeros(0, np.int64)
            )
            cadence = int(np.median(d)) if len(d) else 0
            gaps = d[d > gap_factor * cadence] if cadence else d[:0]
            rows[c] = {
                "frames": int(a.shape[0]),
                "shape": list(a.shape[1:]),
                "chunks": list(a.chunks),
                "dtype": str(a.dtype),
                "codec": _codec(a),
                "first": str(t[0])[:19] if len(t) else None,
                "last": str(t[-1])[:19] if len(t) else None,
                "cadence_s": cadence,
                "gaps": int(len(gaps)),
                "longest_gap_s": int(gaps.max()) if len(gaps) else 0,
                "bad_headers": int(ft.n_bad),
                "in_time_order": bool(
                    np.all(np.diff(ft.times[~np.isnat(ft.times)].astype(np.int64)) > 0)
                ),
            }
        out["years"][year] = rows
    return out


def describe_eve_store(store: EVEStore) -> dict:
    t = store.times()
    ok = t[~np.isnat(t)]
    return {
        "url": store.url,
        "instrument": "EVE",
        "lines": len(store.lines),
        "rows": int(len(t)),
        "first": str(ok.min())[:19] if len(ok) else None,
        "last": str(ok.max())[:19] if len(ok) else None,
    }


def describe(
    archive: Archive, start: dt.datetime | None = None, end: dt.datetime | None = None
) -> dict:
    """A summary of every store of the archive over the years ``start`` .. ``end`` touch
    (what ``sdofm data info`` prints): only those years' headers are read."""
    out = {}
    for name in ("aia", "hmi"):
        store = getattr(archive, name)
        if store is not None:
            out[name] = describe_image_store(store, years=store.years_between(start, end))
    if archive.eve is not None:
        out["eve"] = describe_eve_store(archive.eve)
    return out

"""An archive-scale replica of SDOML v2: real-sized headers, almost no pixels.

What makes the real archive hard to read is its size, not its pixels: each year and
channel carries a per-frame header list of every level-1 FITS keyword, up to ~221 MB
of JSON. The replica has the archive's shape (years with a year boundary, 512 px
frames, 15 frames a chunk, Blosc zstd 5 + bit-shuffle), a frame every 6 min (AIA) or
12 min (HMI) for whole years, and per-frame headers carrying the full keyword set of a
real level-1 header (the AIA 171 and HMI files shipped with sunpy), written as
zarr-python 2 wrote them (sorted keys, indent 4). Only a few chunks hold pixels; the
others are never written and read as zarr's fill value, so a replica costs its
headers' size on disk and almost nothing else.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sdofm.archive.fits import read_fits
from sdofm.archive.writer import create_frame_array
from sdofm.constants import AIA_CHANNELS, AIA_WAVELENGTH, HMI_CHANNELS, disk_radius_px
from sdofm.datasets.sdoml import STORE_NAMES, open_group
from sdofm.storage import join, open_url

CADENCE = {"aia": dt.timedelta(minutes=6), "hmi": dt.timedelta(minutes=12)}
_TEMPLATE_FILE = {"aia": "aia_171_level1.fits", "hmi": "resampled_hmi.fits"}
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "BLANK", "COMMENT", "HISTORY", "CHECKSUM"}
_MEAN = {"94A": 0.53, "131A": 3.2, "171A": 110, "193A": 117, "211A": 34, "304A": 29}
_MEAN.update({"335A": 2.0, "1600A": 36, "1700A": 445})


@dataclass
class ReplicaReport:
    root: str
    frames: dict[str, int] = field(default_factory=dict)  # "year/channel" -> frames
    header_bytes: dict[str, int] = field(default_factory=dict)  # "year/channel" -> .zattrs size


def template_header(instrument: str) -> dict:
    """The keywords of a real level-1 header (sunpy's test files), as sdofm ingests them."""
    try:
        from sunpy.data.test import get_test_filepath

    except ImportError as e:
        raise ImportError(
            "the replica takes its keyword set from sunpy's real test files: "
            "pip install 'sdofm[ingest]'"
        ) from e
    header, _ = read_fits(get_test_filepath(_TEMPLATE_FILE[instrument]), with_data=False)
    return {k: v for k, v in header.items() if k not in _STRUCTURAL}


def _decimals(v: float) -> int:
    text = repr(v)
    return 0 if "e" in text or "." not in text else len(text.split(".")[1])


def _common_lists(template: dict, times: list[dt.datetime], rng) -> dict[str, list]:
    """Per-frame lists shared by an instrument's channels: counters count, measured values
    vary at the template's precision (so each entry is as long as a real one), the rest
    repeat."""
    n = len(times)
    out: dict[str, list] = {}
    for key, v in template.items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            out[key] = [v] * n
        elif isinstance(v, int):
            out[key] = (v + np.arange(n) * 8).tolist() if v > 1000 else [v] * n
        else:
            noisy = v * (1 + 1e-3 * rng.standard_normal(n))
            out[key] = np.round(noisy, _decimals(v)).tolist()
    out["QUALITY"] = [0] * n
    return out


def _channel_lists(instrument: str, channel: str, times: list[dt.datetime], rng) -> dict[str, list]:
    """The lists that differ between channels: observation times, exposure, DEG_COR."""
    n = len(times)
    if instrument == "hmi":
        tai = [t + dt.timedelta(seconds=35) for t in times]
        t_obs = [t.strftime("%Y.%m.%d_%H:%M:%S_TAI") for t in tai]
        return {"T_OBS": t_obs, "T_REC": t_obs, "PIXLUNIT": ["Gauss"] * n}
    offsets = rng.uniform(0, 12, n)
    obs = [t + dt.timedelta(seconds=float(s)) for t, s in zip(times, offsets, strict=True)]
    t_obs = [t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 10000:02d}Z" for t in obs]
    return {
        "T_OBS": t_obs,
        "DATE-OBS": [s[:-1] for s in t_obs],
        "T_REC": [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in times],
        "WAVELNTH": [AIA_WAVELENGTH[channel]] * n,
        "EXPTIME": np.round(2.0 + 0.001 * rng.standard_normal(n), 6).tolist(),
        "DEG_COR": np.round(np.linspace(0.95, 0.9, n), 6).tolist(),
        "PIXLUNIT": ["DN/s"] * n,
    }


def _zarr2_entry(key: str, values: list) -> str:
    """One key of a ``.zattrs`` as zarr-python 2 wrote it (indent 4), by the C encoder."""
    item = ",\n        "
    return (
        f"    {json.dumps(key)}: [\n        "
        + json.dumps(values, separators=(item, ": "))[1:-1]
        + "\n    ]"
    )


def _zarr2_json(entries: dict[str, str]) -> bytes:
    return ("{\n" + ",\n".join(entries[k] for k in sorted(entries)) + "\n}").encode()


def _disk(size: int, mean: float, magnetogram: bool) -> np.ndarray:
    """A limb-darkened disk (or a bipolar field) at ``size`` px: ``(size, size) float32``."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(x, y) / disk_radius_px(size)
    on = r < 1
    if magnetogram:
        return (np.where(on, 300 * np.sin(3 * x / size) * np.exp(-4 * r**2), 0)).astype(np.float32)
    mu = np.sqrt(np.clip(1 - r**2, 0, 1))
    return (mean * np.where(on, 0.4 + 0.6 * mu, 0.1 * np.exp(-8 * (r - 1)))).astype(np.float32)


def write_replica(
    root: str,
    years: Sequence[int] = (2013, 2014),
    aia_channels: Sequence[str] = AIA_CHANNELS,
    hmi_channels: Sequence[str] = HMI_CHANNELS,
    size: int = 512,
    frames_per_chunk: int = 15,
    pixel_chunks: int = 2,
    days: int | None = None,
    storage_options: dict | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ReplicaReport:
    """Write AIA and HMI stores of whole ``years`` under ``root`` (a folder or fsspec URL).

    The first and last ``pixel_chunks`` chunks of each year and channel hold pixels
    (the frames either side of each year boundary); every other chunk is unwritten.
    ``days``: only the first days of each year (small replicas for tests).
    """
    rng = np.random.default_rng(seed)
    fs, base = open_url(root, storage_options)
    report = ReplicaReport(root=root)
    todo = [("aia", c) for c in aia_channels] + [("hmi", c) for c in hmi_channels]
    total, done = len(todo) * len(years), 0
    for instrument in ("aia", "hmi"):
        channels = [c for i, c in todo if i == instrument]
        if not channels:
            continue
        name = STORE_NAMES[instrument][0]
        group = open_group(join(root, name), storage_options, mode="w")
        group.attrs.update({"sdofm_replica": True, "instrument": instrument.upper()})
        template = template_header(instrument)
        for year in years:
            start = dt.datetime(year, 1, 1)
            end = dt.datetime(year + 1, 1, 1) if days is None else start + dt.timedelta(days=days)
            n = int((end - start) / CADENCE[instrument])
            times = [start + k * CADENCE[instrument] for k in range(n)]
            common = {k: _zarr2_entry(k, v) for k, v in _common_lists(template, times, rng).items()}
            ygroup = group.require_group(str(year))
            for c in channels:
                a = create_frame_array(ygroup, c, n, size, frames_per_chunk)
                image = _disk(size, _MEAN.get(c, 1.0), instrument == "hmi")
                k = frames_per_chunk
                for lo in [
                    *range(0, pixel_chunks * k, k),
                    *range((n // k - pixel_chunks) * k, n, k),
                ]:
                    hi = min(lo + k, n)
                    scale = 1 + 0.05 * rng.standard_normal((hi - lo, 1, 1)).astype(np.float32)
                    a[lo:hi] = image[None] * scale
                own = _channel_lists(instrument, c, times, rng)
                raw = _zarr2_json({**common, **{k: _zarr2_entry(k, v) for k, v in own.items()}})
                fs.pipe_file(join(base, name, str(year), c, ".zattrs"), raw)
                report.frames[f"{year}/{c}"] = n
                report.header_bytes[f"{year}/{c}"] = len(raw)
                done += 1
                if progress:
                    progress(done, total)
    return report

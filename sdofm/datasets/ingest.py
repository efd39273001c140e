"""Ingest AIA and HMI level-1 FITS files into an SDOML v2 store, following the SDOML v2 recipe.

AIA: frames with ``QUALITY == 0``; negatives clipped to 0; the disk rescaled to a
fixed solar radius of 976 arcsec, centred and turned solar north up; divided by
max(EXPTIME, 0.01) and by the channel's degradation factor (``DEG_COR``, 1 when
none is given); mean-downsampled to ``size``; float32 DN/s. HMI: valid pixels
only, the same rescale and downsample, 0 off the disk. Every FITS keyword is kept
as an upper-case per-frame attribute list, plus ``DEG_COR`` (AIA) and ``PIXLUNIT``.
Pixels stay in FITS order (row 0 is the southernmost), as the SDOML v2 converter
scripts store sunpy's ``Map.data`` (not checked against the published store).

Frames go through :class:`~sdofm.datasets.synthetic.FrameWriter`, the writer of the
synthetic Sun: the same year groups, arrays, chunking and codec.

The job has two Ray Data passes: headers (cheap: what to skip, what the store
already holds, the order to append in), then pixels, streamed back in time order
to the driver, the only process that writes. A bad file is skipped and reported,
never fatal. Headers are committed after their pixels, every ``commit_every``
frames and at the end, so a crash leaves a store that opens; a re-run drops the
uncommitted tail and adds only what is missing.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdofm.constants import (
    AIA_CHANNELS,
    SDOML_DISK_RADIUS_PX,
    SDOML_RESOLUTION,
    SOLAR_RADIUS_ARCSEC,
)
from sdofm.datasets.sdoml import (
    INSTRUMENT_CHANNELS,
    STORE_NAMES,
    LayoutError,
    SDOMLError,
    clear_header_cache,
    join_url,
    open_group,
    parse_times,
)

FRAMES_PER_CHUNK = 15  # as the SDOML v2 converter scripts
FITS_SUFFIXES = (".fits", ".fts", ".fit", ".fits.gz", ".fts.gz", ".fit.gz")
MIN_EXPTIME = 0.01
_REQUIRED = {
    "aia": ("T_OBS", "EXPTIME", "WAVELNTH", "QUALITY", "CDELT1", "CDELT2", "CRPIX1", "CRPIX2"),
    "hmi": ("T_OBS", "CDELT1", "CDELT2", "CRPIX1", "CRPIX2"),
}
_TELESCOPE = {"aia": "SDO/AIA", "hmi": "SDO/HMI"}
_ANGLE_UNITS = {"arcsec": 1.0, "arcmin": 60.0, "deg": 3600.0}


class IngestError(SDOMLError):
    """The ingest cannot start: no input files, or arguments that do not fit the instrument."""


class SkipFrame(Exception):
    """One file is not used; the message says why (it goes into the report)."""


@dataclass
class FrameInfo:
    """What the header says about one file: where its frame goes."""

    channel: str
    t_obs: str
    time_ns: int  # UTC
    year: str


@dataclass
class IngestReport:
    """What one ingest run did."""

    store: str
    instrument: str
    files: int = 0
    ingested: dict[str, int] = field(default_factory=dict)  # channel -> frames added
    already: list[str] = field(default_factory=list)  # files whose frame the store holds
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    dropped_uncommitted: int = 0  # frames of an interrupted run removed before appending
    seconds: float = 0.0

    @property
    def n_ingested(self) -> int:
        return sum(self.ingested.values())

    @property
    def frames_per_s(self) -> float:
        return self.n_ingested / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- files and headers


def find_fits(source: str | Sequence[str]) -> list[str]:
    """FITS files under a folder (recursively), matching a glob, or named; absolute, sorted."""
    sources = [source] if isinstance(source, str) else list(source)
    found: set[str] = set()
    for s in sources:
        if os.path.isdir(s):
            for root, _dirs, names in os.walk(s):
                found.update(
                    os.path.join(root, n) for n in names if n.lower().endswith(FITS_SUFFIXES)
                )
        elif any(ch in s for ch in "*?["):
            found.update(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(s):
            found.add(s)
        else:
            raise IngestError(f"{s}: no such file or folder, and not a glob pattern")
    if not found:
        raise IngestError(
            f"no FITS files ({', '.join('*' + x for x in FITS_SUFFIXES)}) in {', '.join(sources)}"
        )
    return sorted(os.path.abspath(p) for p in found)


def _json_value(v: Any) -> Any:
    """A FITS card value as JSON: NaN, infinities and undefined values become None."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        return v
    if v is None or type(v).__name__ == "Undefined":
        return None
    return str(v)  # complex values and anything exotic


def header_dict(header) -> dict[str, Any]:
    """Every keyword of an astropy FITS header, upper-case, with JSON values.

    ``COMMENT`` and ``HISTORY`` cards are joined with newlines; blank keywords are dropped.
    """
    out: dict[str, Any] = {}
    for card in header.cards:
        key = card.keyword.strip().upper()
        if not key:
            continue
        if key in ("COMMENT", "HISTORY"):
            text = str(card.value)
            out[key] = f"{out[key]}\n{text}" if key in out else text
            continue
        out[key] = _json_value(card.value)
    return out


def read_fits(path: str, with_data: bool = True) -> tuple[dict[str, Any], np.ndarray | None]:
    """The header of the file's first 2-D image and, with ``with_data``, its pixels ``(ny, nx) float32``.

    Raises :class:`SkipFrame` when the file cannot be read or holds no 2-D image.
    """
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns about harmless keywords (BLANK on floats)
        try:
            with fits.open(path, memmap=False) as hdul:
                hdu = next(
                    (h for h in hdul if h.is_image and h.header.get("NAXIS") == 2),
                    None,
                )
                if hdu is None:
                    raise SkipFrame("no 2-D image in the file")
                header = header_dict(hdu.header)
                data = np.asarray(hdu.data, dtype=np.float32) if with_data else None
        except SkipFrame:
            raise
        except Exception as e:
            what = "corrupt or not a FITS file" if with_data else "unreadable FITS header"
            raise SkipFrame(f"{what}: {type(e).__name__}: {e}") from e
    if data is not None and data.ndim != 2:
        raise SkipFrame(f"corrupt image: data of shape {data.shape}, expected 2-D")
    return header, data


def _rsun_arcsec(header: Mapping[str, Any]) -> float | None:
    if header.get("RSUN_OBS"):
        return float(header["RSUN_OBS"])
    if header.get("R_SUN") and header.get("CDELT1"):  # R_SUN is in pixels
        return float(header["R_SUN"]) * abs(float(header["CDELT1"]))
    return None


def check_header(
    header: Mapping[str, Any], instrument: str, channel: str | None = None
) -> FrameInfo:
    """Whether a level-1 header can be ingested and where its frame goes.

    Raises :class:`SkipFrame` naming the reason: another instrument, a missing
    keyword, another level, ``QUALITY != 0``, a channel SDOML does not hold, a bad ``T_OBS``.
    """
    want = _TELESCOPE[instrument]
    telescope = str(header.get("TELESCOP") or "").strip().upper()
    if not telescope.startswith(want):
        raise SkipFrame(f"not an {want} file (TELESCOP={header.get('TELESCOP')!r})")
    missing = [k for k in _REQUIRED[instrument] if header.get(k) in (None, "")]
    if _rsun_arcsec(header) is None:
        missing.append("RSUN_OBS")
    if missing:
        raise SkipFrame(f"missing keyword(s) {', '.join(missing)}")
    if instrument == "aia" and header.get("LVL_NUM") not in (None, 1, 1.0):
        raise SkipFrame(f"not level 1 (LVL_NUM={header['LVL_NUM']})")
    quality = header.get("QUALITY")
    if quality not in (None, 0):
        raise SkipFrame(f"QUALITY={quality} (only QUALITY == 0 is kept)")
    if instrument == "aia":
        found = f"{int(float(header['WAVELNTH']))}A"
        if found not in AIA_CHANNELS:
            raise SkipFrame(f"WAVELNTH {header['WAVELNTH']} is not an SDOML AIA channel")
        if channel is not None and found != channel:
            raise SkipFrame(f"channel {found}, not the {channel} asked for")
    elif channel is not None:
        found = channel
    elif "MAGNETOGRAM" in str(header.get("CONTENT") or "").upper():
        found = "Bz"  # a line-of-sight magnetogram stands in for Bz
    else:
        raise SkipFrame(
            f"HMI CONTENT={header.get('CONTENT')!r} is not a magnetogram; name the component "
            "(channel Bx, By or Bz) to store it as one"
        )
    t_obs = str(header["T_OBS"])
    times, bad = parse_times([t_obs])
    if bad[0]:
        raise SkipFrame(f"unparseable T_OBS {t_obs!r}")
    t = times[0]
    return FrameInfo(
        channel=found,
        t_obs=t_obs,
        time_ns=int(t.astype(np.int64)),
        year=str(t.astype("datetime64[Y]")),
    )


# --------------------------------------------------------------------------- pixels


def _linear_wcs(header: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(CD (2, 2) arcsec/px, CRPIX (2,) 1-based, CRVAL (2,) arcsec)`` of the header.

    Near the Sun (< 0.3 deg) the TAN projection is linear to better than 1e-5.
    """
    scale = []
    for i in (1, 2):
        unit = str(header.get(f"CUNIT{i}") or "arcsec").strip().lower()
        if unit not in _ANGLE_UNITS:
            raise SkipFrame(f"CUNIT{i}={unit!r} is not an angle")
        scale.append(_ANGLE_UNITS[unit])
    scale_ = np.array(scale)
    cdelt = np.array([float(header["CDELT1"]), float(header["CDELT2"])]) * scale_
    if all(header.get(f"PC{i}_{j}") is not None for i in (1, 2) for j in (1, 2)):
        pc = np.array(
            [[float(header[f"PC{i}_{j}"]) for j in (1, 2)] for i in (1, 2)], dtype=np.float64
        )
    else:
        rho = math.radians(float(header.get("CROTA2") or 0.0))
        lam = cdelt[1] / cdelt[0]
        pc = np.array([[math.cos(rho), -lam * math.sin(rho)], [math.sin(rho) / lam, math.cos(rho)]])
    crpix = np.array([float(header["CRPIX1"]), float(header["CRPIX2"])])
    crval = np.array([float(header.get("CRVAL1") or 0.0), float(header.get("CRVAL2") or 0.0)])
    return cdelt[:, None] * pc, crpix, crval * scale_


def _bilinear(
    src: np.ndarray, valid: np.ndarray, qx: np.ndarray, qy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sums over the valid neighbours of each sample.

    ``src, valid: (ny, nx)``; ``qx, qy: (...)`` 0-based pixel coordinates ->
    ``(sum w * src, sum w)`` over in-bounds valid neighbours, both shaped like ``qx``.
    """
    ny, nx = src.shape
    flat_src, flat_ok = src.ravel(), valid.ravel()
    x0, y0 = np.floor(qx), np.floor(qy)
    tx, ty = (qx - x0).astype(np.float32), (qy - y0).astype(np.float32)
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    acc = np.zeros(qx.shape, np.float32)
    wsum = np.zeros(qx.shape, np.float32)
    for dy, wy in ((0, 1 - ty), (1, ty)):
        yi = y0 + dy
        in_y = (yi >= 0) & (yi < ny)
        row = yi.clip(0, ny - 1) * nx
        for dx, wx in ((0, 1 - tx), (1, tx)):
            xi = x0 + dx
            flat = row + xi.clip(0, nx - 1)
            w = wx * wy * (in_y & (xi >= 0) & (xi < nx) & flat_ok[flat])
            acc += w * flat_src[flat]
            wsum += w
    return acc, wsum


def disk_radius_px(size: int) -> float:
    """The solar radius in pixels of an SDOML frame of ``size`` px (204 at 512)."""
    return SDOML_DISK_RADIUS_PX * size / SDOML_RESOLUTION


def solar_resample(
    data: np.ndarray, header: Mapping[str, Any], size: int, zero_off_disk: bool = False
) -> np.ndarray:
    """Put the disk at a fixed 976-arcsec radius in the centre, solar north up, at ``size`` px.

    ``data: (ny, nx)`` in FITS order -> ``(size, size) float32``, FITS order, the
    disk radius :func:`disk_radius_px`. Non-finite pixels are invalid. Samples are
    taken bilinearly on a grid ``f`` times finer than the output, ``f`` chosen so its
    pixels match the input's (8 for 4096 -> 512); a sample needs at least half its
    weight on valid pixels, and an output pixel is the mean of its valid samples
    (0 without any). With ``zero_off_disk`` only samples on the disk count and pixels
    whose centre lies off the disk are 0.
    """
    cd, crpix, crval = _linear_wcs(header)
    rsun = _rsun_arcsec(header)
    if rsun is None or not rsun > 0:
        raise SkipFrame(f"no usable solar radius (RSUN_OBS={header.get('RSUN_OBS')!r})")
    radius = disk_radius_px(size)
    out_scale = SOLAR_RADIUS_ARCSEC / radius  # arcsec (at 976") per output pixel
    in_scale = abs(float(np.linalg.det(cd))) ** 0.5 * SOLAR_RADIUS_ARCSEC / rsun
    f = max(1, round(out_scale / in_scale))
    m = size * f
    c = (m - 1) / 2
    # Fine-grid pixel (a, b), 0-based -> arcsec at the true radius -> input pixel, 0-based.
    a_map = np.linalg.inv(cd) * (out_scale / f) * (rsun / SOLAR_RADIUS_ARCSEC)
    q0 = crpix - 1 - np.linalg.inv(cd) @ crval - a_map @ np.array([c, c])

    valid = np.isfinite(data)
    src = np.where(valid, data, 0).astype(np.float32, copy=False)
    out = np.zeros((size, size), np.float32)
    a = np.arange(m, dtype=np.float64)[None, :]
    rows = max(1, (1 << 20) // (m * f))  # output rows per strip: ~1M samples in memory
    for r0 in range(0, size, rows):
        r1 = min(size, r0 + rows)
        b = np.arange(r0 * f, r1 * f, dtype=np.float64)[:, None]
        qx = q0[0] + a_map[0, 0] * a + a_map[0, 1] * b
        qy = q0[1] + a_map[1, 0] * a + a_map[1, 1] * b
        acc, wsum = _bilinear(src, valid, qx, qy)
        ok = wsum >= 0.5
        if zero_off_disk:
            ok &= (a - c) ** 2 + (b - c) ** 2 <= (radius * f) ** 2
        value = np.where(ok, acc / np.where(ok, wsum, 1), 0).reshape(r1 - r0, f, size, f)
        count = ok.reshape(r1 - r0, f, size, f).sum(axis=(1, 3))
        out[r0:r1] = value.sum(axis=(1, 3)) / np.maximum(count, 1)
    if zero_off_disk:
        u = np.arange(size) - (size - 1) / 2
        out[u[:, None] ** 2 + u[None, :] ** 2 > radius**2] = 0
    return out


def prepare_frame(
    data: np.ndarray, header: Mapping[str, Any], instrument: str, size: int, deg_cor: float = 1.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """The SDOML v2 recipe for one level-1 image.

    ``data: (ny, nx)`` -> ``(frame: (size, size) float32, attributes)``: DN/s for
    AIA (``DEG_COR`` recorded), the input unit (Gauss for magnetograms) for HMI.
    """
    if instrument == "aia":
        frame = solar_resample(np.maximum(data, 0), header, size)
        frame /= np.float32(max(float(header["EXPTIME"]), MIN_EXPTIME) * deg_cor)
        attrs = {**header, "DEG_COR": float(deg_cor), "PIXLUNIT": "DN/s"}
    else:
        frame = solar_resample(data, header, size, zero_off_disk=True)
        attrs = {**header, "PIXLUNIT": str(header.get("BUNIT") or "").strip() or "Gauss"}
    if not frame.any():
        raise SkipFrame("no valid pixel inside the frame")
    return frame, attrs


def process_file(
    path: str,
    instrument: str,
    size: int,
    channel: str | None = None,
    deg_cor: Mapping[str, float] | None = None,
) -> tuple[FrameInfo, np.ndarray, dict[str, Any]]:
    """Read, check and prepare one file: ``(info, frame: (size, size) float32, attributes)``.

    Raises :class:`SkipFrame` with the reason when the file is not used.
    """
    header, data = read_fits(path)
    info = check_header(header, instrument, channel)
    factor = (deg_cor or {}).get(info.channel, 1.0) if instrument == "aia" else 1.0
    frame, attrs = prepare_frame(data, header, instrument, size, factor)
    return info, frame, attrs


# --------------------------------------------------------------------------- Ray Data passes


def _plan_batch(batch: dict[str, np.ndarray], instrument: str, channel: str | None) -> dict:
    rows: dict[str, list] = {k: [] for k in ("path", "channel", "t_obs", "time_ns", "reason")}
    for path in batch["path"]:
        info, reason = None, ""
        try:
            info = check_header(read_fits(str(path), with_data=False)[0], instrument, channel)
        except SkipFrame as e:
            reason = str(e)
        except Exception as e:  # a file must never stop the job
            reason = f"{type(e).__name__}: {e}"
        rows["path"].append(str(path))
        rows["channel"].append(info.channel if info else "")
        rows["t_obs"].append(info.t_obs if info else "")
        rows["time_ns"].append(info.time_ns if info else 0)
        rows["reason"].append(reason)
    return {k: np.asarray(v, dtype=np.int64 if k == "time_ns" else object) for k, v in rows.items()}


def _process_batch(
    batch: dict[str, np.ndarray],
    instrument: str,
    size: int,
    channel: str | None,
    deg_cor: dict[str, float],
) -> dict:
    n = len(batch["path"])
    frames = np.zeros((n, size, size), np.float32)
    headers, reasons = [], []
    for j, path in enumerate(batch["path"]):
        reason, attrs = "", {}
        try:
            info, frames[j], attrs = process_file(str(path), instrument, size, channel, deg_cor)
            if (info.channel, info.time_ns) != (batch["channel"][j], batch["time_ns"][j]):
                reason = "the file changed while it was being ingested"
        except SkipFrame as e:
            reason = str(e)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
        headers.append(json.dumps(attrs))
        reasons.append(reason)
    return {
        **batch,
        "frame": frames,
        "header": np.asarray(headers, dtype=object),
        "reason": np.asarray(reasons, dtype=object),
    }


def _dataset(items: list[dict], fn: Callable, batch_size: int, num_cpus: float, **kwargs):
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    ds = ds.map_batches(
        fn, batch_size=batch_size, num_cpus=num_cpus, batch_format="numpy", fn_kwargs=kwargs
    )
    ds.context.execution_options.preserve_order = True  # append in the planned (time) order
    ds.context.enable_progress_bars = False  # the caller shows one
    return ds


# --------------------------------------------------------------------------- the store


def store_url(out: str, instrument: str) -> str:
    """``out`` itself when it names a ``.zarr`` store, else the SDOML v2 store name under it."""
    if out.rstrip("/").endswith(".zarr"):
        return out.rstrip("/")
    return join_url(out, STORE_NAMES[instrument][0])


@dataclass
class _Target:
    group: Any
    size: int | None  # frame size of the arrays it holds, None when empty
    frames_per_chunk: int | None
    times: dict[str, set[int]]  # channel -> committed frame times (UTC ns)
    dropped: int  # uncommitted frames removed


def _open_target(url: str, instrument: str, storage_options: dict | None) -> _Target:
    """Open (or create) the store to append to; :class:`LayoutError` if it has another layout."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/")
    name = instrument.upper()
    if not fs.exists(path):  # created when the first frame is written
        return _Target(group=None, size=None, frames_per_chunk=None, times={}, dropped=0)
    if fs.isfile(path):
        raise LayoutError(f"{url} is a file, not an SDOML {name} store")
    if fs.exists(path + "/zarr.json"):
        raise LayoutError(
            f"{url} is a zarr format 3 store; SDOML stores are zarr format 2: "
            "choose another output folder"
        )
    if not fs.exists(path + "/.zgroup") and fs.ls(path):
        raise LayoutError(
            f"{url} exists and is not a zarr group (no .zgroup): choose a new folder "
            f"or an SDOML {name} store to append to"
        )
    group = open_group(url, storage_options, mode="a")
    attrs = dict(group.attrs)
    if attrs.get("sdofm_synthetic"):
        raise LayoutError(
            f"{url} holds the synthetic Sun written by `sdofm data synth`: ingest real frames "
            "into another folder"
        )
    if attrs.get("instrument") and str(attrs["instrument"]).upper() != name:
        raise LayoutError(f"{url} is an {attrs['instrument']} store, not an {name} store")
    known = INSTRUMENT_CHANNELS[instrument]
    problems: list[str] = []
    problems += [f"array {k!r} at the top level" for k, _ in group.arrays()]
    sizes: set[int] = set()
    chunks: set[int] = set()
    arrays = []
    for year, ygroup in group.groups():
        if not (len(year) == 4 and year.isdigit()):
            problems.append(f"group {year!r} is not a year")
            continue
        problems += [f"group {year}/{k} inside a year" for k, _ in ygroup.groups()]
        for ch, a in ygroup.arrays():
            if ch not in known:
                problems.append(f"{year}/{ch} is not an {name} channel ({', '.join(known)})")
            elif a.ndim != 3 or a.dtype != np.float32 or a.shape[1] != a.shape[2]:
                problems.append(
                    f"{year}/{ch} has shape {a.shape}, dtype {a.dtype}; expected (N, S, S) float32"
                )
            else:
                sizes.add(int(a.shape[1]))
                chunks.add(int(a.chunks[0]))
                arrays.append((year, ch, a))
    if len(sizes) > 1:
        problems.append(f"frames of several sizes: {sorted(sizes)}")
    if problems:
        raise LayoutError(
            f"{url} is not an SDOML {name} store sdofm can append to:\n  " + "\n  ".join(problems)
        )
    if not attrs and not arrays:
        group.update_attributes({"instrument": name, "sdofm_ingest": True})
        attrs = dict(group.attrs)
    times: dict[str, set[int]] = {}
    dropped = 0
    for _year, ch, a in arrays:
        raw = a.attrs.get("T_OBS")
        committed = len(raw) if isinstance(raw, list) else 0
        if a.shape[0] > committed and attrs.get("sdofm_ingest"):
            # Our own interrupted run: pixels past the header lists were never committed.
            dropped += a.shape[0] - committed
            a.resize((committed, *a.shape[1:]))
        if committed:
            t, bad = parse_times(raw)
            times.setdefault(ch, set()).update(t[~bad].astype(np.int64).tolist())
    return _Target(
        group=group,
        size=next(iter(sizes)) if sizes else None,
        frames_per_chunk=min(chunks) if chunks else None,
        times=times,
        dropped=dropped,
    )


# --------------------------------------------------------------------------- the job


@dataclass
class _Job:
    """The settings of one run, as the Ray tasks and the writer need them."""

    url: str
    instrument: str
    size: int
    frames_per_chunk: int
    channel: str | None
    deg_cor: dict[str, float]
    storage_options: dict | None
    commit_every: int
    batch_size: int | None
    num_cpus: float


def ingest(
    source: str | Sequence[str],
    out: str,
    instrument: str,
    *,
    size: int | None = None,
    frames_per_chunk: int | None = None,
    channel: str | None = None,
    deg_cor: Mapping[str, float] | None = None,
    storage_options: dict | None = None,
    commit_every: int = 1000,
    batch_size: int | None = None,
    num_cpus: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Append the frames of level-1 FITS files to the SDOML store ``store_url(out, instrument)``.

    ``source``: a folder (searched recursively), a glob or a list of files.
    ``size``: output frame size (default: the store's, else 512). ``frames_per_chunk``:
    chunking of new arrays (default: the store's, else 15). ``channel``: HMI component
    the files hold (default: ``Bz`` for line-of-sight magnetograms), or the one AIA
    channel to keep. ``deg_cor``: AIA channel -> degradation factor divided out.
    Re-running over the same files adds nothing: a frame is known by channel and
    ``T_OBS``. Headers are committed every ``commit_every`` frames of an array and
    at the end. Ray tasks take ``batch_size`` files (default: about four tasks per
    task slot of the cluster, at most 16 files) and ``num_cpus`` CPUs each.
    ``progress(done, total)`` counts files read, headers then pixels. Uses the
    running Ray instance (Ray Data starts a local one otherwise).
    """
    t0 = time.perf_counter()
    if instrument not in INSTRUMENT_CHANNELS:
        raise IngestError(f"instrument must be aia or hmi, not {instrument!r}")
    known = INSTRUMENT_CHANNELS[instrument]
    if channel is not None and channel not in known:
        raise IngestError(
            f"channel {channel!r} is not an {instrument.upper()} channel ({', '.join(known)})"
        )
    deg = {str(k): float(v) for k, v in (deg_cor or {}).items()}
    for k, v in deg.items():
        if k not in AIA_CHANNELS or instrument != "aia":
            raise IngestError(
                f"degradation factor for {k!r}: not an AIA channel ({', '.join(AIA_CHANNELS)})"
            )
        if not (math.isfinite(v) and v > 0):
            raise IngestError(f"degradation factor for {k} must be > 0, got {v}")
    files = find_fits(source)
    url = store_url(out, instrument)
    target = _open_target(url, instrument, storage_options)
    if size is not None and target.size is not None and size != target.size:
        raise LayoutError(f"{url} holds {target.size} px frames: cannot add {size} px frames")
    job = _Job(
        url=url,
        instrument=instrument,
        size=size or target.size or SDOML_RESOLUTION,
        frames_per_chunk=frames_per_chunk or target.frames_per_chunk or FRAMES_PER_CHUNK,
        channel=channel,
        deg_cor=deg,
        storage_options=storage_options,
        commit_every=commit_every,
        batch_size=batch_size,
        num_cpus=num_cpus,
    )
    report = IngestReport(store=url, instrument=instrument.upper(), files=len(files))
    report.dropped_uncommitted = target.dropped
    total, done = len(files), 0

    # Pass 1: headers only.
    heads = _dataset(
        [{"path": p} for p in files],
        _plan_batch,
        32,
        num_cpus,
        instrument=instrument,
        channel=channel,
    )
    rows: list[dict] = []
    for batch in heads.iter_batches(batch_size=None, batch_format="numpy"):
        rows += [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        done += len(batch["path"])
        if progress:
            progress(done, total)
    plan: list[dict] = []
    first: dict[tuple[str, int], str] = {}
    for r in rows:
        key = (str(r["channel"]), int(r["time_ns"]))
        if r["reason"]:
            report.skipped.append((r["path"], r["reason"]))
        elif key[1] in target.times.get(key[0], ()):
            report.already.append(r["path"])
        elif key in first:
            report.skipped.append((r["path"], f"same channel and T_OBS as {first[key]}"))
        else:
            first[key] = r["path"]
            year = str(np.datetime64(key[1], "ns").astype("datetime64[Y]"))
            plan.append({"path": r["path"], "channel": key[0], "time_ns": key[1], "year": year})
    plan.sort(key=lambda r: (r["year"], r["channel"], r["time_ns"], r["path"]))
    total += len(plan)
    if progress:
        progress(done, total)

    # Pass 2: pixels, back in plan order; only this process writes.
    if plan:
        group = target.group if target.group is not None else _create_store(job)
        _write(plan, group, job, report, lambda n: progress(done + n, total) if progress else None)
    clear_header_cache()
    report.seconds = time.perf_counter() - t0
    return report


def _auto_batch(n_files: int, num_cpus: float) -> int:
    """Files per task: tasks enough to keep every slot busy, few enough that small frames
    are not all Ray overhead (a task costs tens of ms, a 128 px frame about 3)."""
    import ray

    slots = max(1, int(ray.cluster_resources().get("CPU", 1) / num_cpus))
    return int(np.clip(n_files // (4 * slots), 1, 16))


def _create_store(job: _Job):
    group = open_group(job.url, job.storage_options, mode="a")
    group.update_attributes({"instrument": job.instrument.upper(), "sdofm_ingest": True})
    return group


def _write(
    plan: list[dict], group, job: _Job, report: IngestReport, tick: Callable[[int], None]
) -> None:
    """Receive the prepared frames in plan order and append them, one writer per (year, channel)."""
    from concurrent.futures import ThreadPoolExecutor

    from sdofm.datasets.synthetic import FrameWriter

    reserve = Counter((r["year"], r["channel"]) for r in plan)
    writers: dict[tuple[str, str], FrameWriter] = {}
    since_commit: Counter = Counter()
    pool = ThreadPoolExecutor(1)  # compression overlaps with receiving the next frames
    done = 0
    try:
        ds = _dataset(
            plan,
            _process_batch,
            job.batch_size or _auto_batch(len(plan), job.num_cpus),
            job.num_cpus,
            instrument=job.instrument,
            size=job.size,
            channel=job.channel,
            deg_cor=job.deg_cor,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for j in range(len(batch["path"])):
                done += 1
                if batch["reason"][j]:
                    report.skipped.append((str(batch["path"][j]), str(batch["reason"][j])))
                    continue
                key = (str(batch["year"][j]), str(batch["channel"][j]))
                w = writers.get(key)
                if w is None:
                    new = key[0] not in group or key[1] not in group[key[0]]
                    w = writers[key] = FrameWriter(
                        group.require_group(key[0]),
                        key[1],
                        job.size,
                        job.frames_per_chunk,
                        pool,
                        reserve=reserve[key],
                    )
                    if new:  # an empty T_OBS list at once: the store opens even if we stop now
                        w.commit()
                w.add(batch["frame"][j], json.loads(str(batch["header"][j])))
                report.ingested[key[1]] = report.ingested.get(key[1], 0) + 1
                since_commit[key] += 1
                if since_commit[key] >= job.commit_every:
                    w.commit()
                    since_commit[key] = 0
            tick(done)
        for w in writers.values():
            w.close()
    finally:
        pool.shutdown()
        clear_header_cache()  # headers this process read before are stale, even after a failure

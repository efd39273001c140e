"""The SDOML v2 recipe for one AIA or HMI level-1 FITS file, in plain numpy (no Ray).

AIA: frames with ``QUALITY == 0``; negatives clipped to 0; the disk rescaled to a
fixed solar radius of 976 arcsec, centred and turned solar north up; divided by
max(EXPTIME, 0.01) and by the channel's degradation factor (``DEG_COR``, 1 when
none is given); mean-downsampled to ``size``; float32 DN/s. HMI: valid pixels
only, the same rescale and downsample, 0 off the disk. Every FITS keyword is kept
as an upper-case per-frame attribute list, plus ``DEG_COR`` (AIA) and ``PIXLUNIT``.
Pixels stay in FITS order (row 0 is the southernmost), as the SDOML v2 converter
scripts store sunpy's ``Map.data`` (not checked against the published store).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdofm.constants import AIA_CHANNELS, SOLAR_RADIUS_ARCSEC, disk_radius_px
from sdofm.datasets.sdoml import parse_times
from sdofm.datasets.transforms import exposure_normalise

_REQUIRED = {
    "aia": ("T_OBS", "EXPTIME", "WAVELNTH", "QUALITY", "CDELT1", "CDELT2", "CRPIX1", "CRPIX2"),
    "hmi": ("T_OBS", "CDELT1", "CDELT2", "CRPIX1", "CRPIX2"),
}
_TELESCOPE = {"aia": "SDO/AIA", "hmi": "SDO/HMI"}
_ANGLE_UNITS = {"arcsec": 1.0, "arcmin": 60.0, "deg": 3600.0}


class SkipFrame(Exception):
    """One file is not used; the message says why (it goes into the report)."""


@dataclass
class FrameInfo:
    """What the header says about one file: where its frame goes."""

    channel: str
    t_obs: str
    time_ns: int  # UTC
    year: str


# --------------------------------------------------------------------------- headers


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
        frame = exposure_normalise(frame[None], float(header["EXPTIME"]))[0]
        frame /= np.float32(deg_cor)
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

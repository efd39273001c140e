"""A synthetic Sun written in the exact SDOML v2 layout, with its hidden truth beside it.

The physics is simple but causal, so that science heads have something true to learn:

* a disk of fixed radius (204 px at 512 px), limb brightening in the EUV, limb
  darkening in the UV, an off-limb corona falling off with height;
* active regions (ARs) that emerge, decay and rotate with differential rotation
  (Snodgrass), at latitudes |lat| ~ N(15.7, 6.1) deg; each is a bipole in HMI whose
  leading polarity follows Hale's law (solar cycle 24: negative in the north,
  positive in the south) and Joy's law tilt;
* every AIA channel is driven by the same hidden state (the ARs' flux and a
  per-AR temperature), with a channel-specific temperature response, so the
  channels are physically related;
* flares in ARs that brighten the hot channels (94, 131 A) most, and the EVE lines;
* per-channel degradation curves: as in SDOML v2 the stored pixels are DN/s,
  already divided by exposure and by the degradation factor, recorded as ``DEG_COR``.

Image orientation follows the SDOML v2 archive (sunpy ``Map.data`` of level-1 FITS,
solar north up) and ``sdofm data ingest``: pixels in FITS order, so row 0 is the
SOUTH edge and solar north is at the last row (display with ``origin="lower"``);
column 0 is the east edge, solar west at high column index. Pixel ``(row, col)``
is at ``x = (col - c) / R`` (west), ``y = (row - c) / R`` (north) solar radii, with
``c = (size - 1) / 2`` and ``R`` the disk radius; every AIA channel and the HMI
``Bx`` (positive to the west), ``By`` (positive to the north) and ``Bz`` (positive
outwards) share it. B0 = 0, so latitude maps to rows only through
``y = sin(lat)``: a northern active region lies at row indices above ``c``.

Layout quirks reproduced: year groups, per-channel frame counts and gaps, days
stored out of order inside a year (frames within a day in time order), per-frame
header lists in ``.zattrs``, AIA ``T_OBS`` in UTC with ``Z``, HMI ``T_OBS`` in TAI,
EVE ``Time`` strings and negative irradiance for missing data.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from sdofm.config import Config, SynthConfig, dump_config
from sdofm.constants import (
    AIA_CHANNELS,
    AIA_EXPTIME,
    AIA_WAVELENGTH,
    EVE_LINE_TABLE,
    HMI_CHANNELS,
    LEAP_SECONDS,
    SDOML_DISK_RADIUS_PX,
    SDOML_RESOLUTION,
    SOLAR_RADIUS_ARCSEC,
)
from sdofm.datasets.sdoml import STORE_NAMES, SDOMLError, clear_header_cache, join_url, open_group

IMAGE_ORIENTATION = "FITS order: row 0 south, north at the last row; column 0 east"

TRUTH_FILE = "synthetic_truth.json"
TRUTH_FRAMES_FILE = "synthetic_truth_frames.parquet"
_NS = 1_000_000_000
_DAY = 86400.0

# Per AIA channel: quiet-Sun level (DN/s), EUV limb brightening, coronal scale height
# (solar radii), AR response, temperature exponent of that response, flare response,
# network-texture contrast, degradation e-folding time (years).
_AIA = {
    #        quiet  limb  height  ar    temp  flare  tex   tau_deg
    "94A": (0.35, 0.6, 0.08, 8.0, 2.0, 60.0, 0.05, 9.0),
    "131A": (2.2, 0.6, 0.08, 5.0, 1.0, 90.0, 0.08, 6.0),
    "171A": (80.0, 0.8, 0.06, 5.0, -0.5, 3.0, 0.15, 5.0),
    "193A": (70.0, 0.8, 0.10, 8.0, 0.5, 6.0, 0.15, 7.0),
    "211A": (18.0, 0.8, 0.10, 10.0, 1.0, 8.0, 0.12, 4.0),
    "304A": (22.0, 0.4, 0.03, 4.0, -0.3, 5.0, 0.25, 2.5),
    "335A": (1.2, 0.6, 0.10, 8.0, 1.5, 20.0, 0.08, 3.0),
    "1600A": (55.0, -0.45, 0.01, 2.0, 0.0, 4.0, 0.25, 6.0),
    "1700A": (800.0, -0.55, 0.01, 0.6, 0.0, 0.5, 0.10, 10.0),
}
_AIA_TIME_OFFSET_S = {  # where in the 12-s AIA cycle each channel is exposed
    "94A": 2.12,
    "131A": 6.62,
    "171A": 9.35,
    "193A": 4.84,
    "211A": 0.61,
    "304A": 6.13,
    "335A": 1.63,
    "1600A": 3.13,
    "1700A": 11.32,
}
_HMI_NOISE_G = {"Bx": 12.0, "By": 12.0, "Bz": 5.0}
_DEG_EPOCH = dt.datetime(2010, 5, 1)  # degradation measured from the start of the mission
_HALE_NORTH_LEADING = -1.0  # cycle 24


@dataclass
class ActiveRegion:
    id: int
    lat: float  # deg
    lon: float  # central-meridian longitude at emergence, deg (0 = disk centre, + = west)
    t_emerge: float  # s since the synthetic epoch
    rise: float  # s
    decay: float  # s (e-folding)
    flux: float  # peak field of each polarity, G at 512 px
    size: float  # deg, Gaussian sigma of one polarity
    separation: float  # deg between the polarities
    tilt: float  # deg, Joy's law
    leading_sign: float  # +1 / -1 (Hale's law)
    temperature: float  # hidden plasma state: ~0.5 (cool) .. 1.5 (hot)

    def envelope(self, t: float) -> float:
        """0 before emergence, rises over ``rise``, then decays exponentially."""
        if t <= self.t_emerge:
            return 0.0
        s = t - self.t_emerge
        if s < self.rise:
            return math.sin(0.5 * math.pi * s / self.rise) ** 2
        return math.exp(-(s - self.rise) / self.decay)

    def longitude(self, t: float) -> float:
        """Central-meridian longitude at time ``t`` (synodic differential rotation)."""
        s2 = math.sin(math.radians(self.lat)) ** 2
        omega = 14.713 - 2.396 * s2 - 1.787 * s2 * s2 - 0.9856  # deg/day, Snodgrass minus Earth
        return self.lon + omega * (t - self.t_emerge) / _DAY


@dataclass
class Flare:
    t_peak: float  # s since the synthetic epoch
    ar_id: int
    magnitude: float  # peak brightening factor
    rise: float  # s
    decay: float  # s

    def profile(self, t: np.ndarray | float) -> np.ndarray:
        """Gaussian rise then exponential decay, 1 at the peak."""
        s = np.asarray(t, dtype=np.float64) - self.t_peak
        return np.where(
            s < 0, np.exp(-0.5 * (s / self.rise) ** 2), np.exp(-np.maximum(s, 0) / self.decay)
        )


@dataclass
class SynthReport:
    root: str
    frames: dict[str, int] = field(default_factory=dict)
    eve_rows: int = 0
    reused: bool = False


# --------------------------------------------------------------------------- the Sun


class SyntheticSun:
    """The hidden state and the renderer; deterministic from ``cfg.seed``."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.res = cfg.resolution
        periods = sorted(cfg.periods, key=lambda p: p.start)
        self.epoch = dt.datetime.combine(periods[0].start, dt.time())
        self.t_end = (
            dt.datetime.combine(periods[-1].start, dt.time()) - self.epoch
        ).total_seconds() + periods[-1].days * _DAY
        seeds = np.random.SeedSequence(cfg.seed).spawn(6)
        self.rng_ar, self.rng_flare, self.rng_gap, self.rng_noise, self.rng_order, self.rng_eve = (
            np.random.default_rng(s) for s in seeds
        )
        self.radius = SDOML_DISK_RADIUS_PX * self.res / SDOML_RESOLUTION
        self.regions = self._make_regions()
        self.flares = self._make_flares()
        self._grid()
        self._noise_bank = self.rng_noise.standard_normal(
            (8, 2 * self.res, 2 * self.res), dtype=np.float32
        )

    # ---- hidden state

    def _make_regions(self) -> list[ActiveRegion]:
        rng = self.rng_ar
        lifetime_days = 12.0
        start = -25 * _DAY  # regions already on the disk when the data begin
        span_days = (self.t_end - start) / _DAY
        # About half the Sun is visible: twice the visible count exists on the sphere.
        n = rng.poisson(2 * self.cfg.active_regions * span_days / lifetime_days)
        regions = []
        for i in range(n):
            north = rng.random() < 0.5
            lat = float(np.clip(rng.normal(15.7, 6.1), 3, 40)) * (1 if north else -1)
            regions.append(
                ActiveRegion(
                    id=i,
                    lat=lat,
                    lon=float(rng.uniform(-180, 180)),
                    t_emerge=float(rng.uniform(start, self.t_end)),
                    rise=float(rng.uniform(0.5, 2.0)) * _DAY,
                    decay=float(rng.uniform(4, 12)) * _DAY,
                    flux=float(rng.uniform(400, 2200)),
                    size=float(rng.uniform(1.2, 3.0)),
                    separation=float(rng.uniform(4, 10)),
                    tilt=0.5 * abs(lat),
                    leading_sign=_HALE_NORTH_LEADING * (1 if north else -1),
                    temperature=float(rng.uniform(0.5, 1.5)),
                )
            )
        return regions

    def _make_flares(self) -> list[Flare]:
        rng = self.rng_flare
        n = rng.poisson(self.cfg.flares_per_day * self.t_end / _DAY)
        flares = []
        for t in np.sort(rng.uniform(0, self.t_end, n)):
            weights = np.array(
                [r.envelope(t) * r.flux * (self._visibility(r, t) > 0.2) for r in self.regions]
            )
            if weights.sum() <= 0:
                continue
            ar = int(rng.choice(len(self.regions), p=weights / weights.sum()))
            flares.append(
                Flare(
                    t_peak=float(t),
                    ar_id=self.regions[ar].id,
                    magnitude=float(10 ** rng.uniform(0, 2)),
                    rise=float(rng.uniform(3, 12)) * 60,
                    decay=float(rng.uniform(15, 60)) * 60,
                )
            )
        return flares

    @staticmethod
    def _vector(lat: float, lon: float) -> tuple[float, float, float]:
        """Unit vector (x west, y north, z towards the observer); B0 = 0."""
        la, lo = math.radians(lat), math.radians(lon)
        return math.cos(la) * math.sin(lo), math.sin(la), math.cos(la) * math.cos(lo)

    def _visibility(self, r: ActiveRegion, t: float) -> float:
        z = self._vector(r.lat, r.longitude(t))[2]
        return min(max((z + 0.15) / 0.3, 0.0), 1.0)  # fades out just past the limb

    def _grid(self) -> None:
        n = self.res
        c = (n - 1) / 2
        ax = (np.arange(n, dtype=np.float32) - c) / self.radius
        # Image-plane coordinate in solar radii along either axis. FITS order, as the
        # SDOML v2 archive: x (west) grows with the column, y (north) with the row,
        # so row 0 is the south edge.
        self.ax = ax
        x, y = np.meshgrid(ax, ax)
        rho = np.sqrt(x * x + y * y)
        self.on_disk = rho <= 1.0
        mu = np.sqrt(np.clip(1 - rho * rho, 0, 1))
        # Static network texture: smooth random field, shared by all channels.
        k = np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None, :] ** 2
        white = self.rng_noise.standard_normal((n, n))
        tex = np.real(np.fft.ifft2(np.fft.fft2(white) * np.exp(-k * (n / 12) ** 2)))
        tex = (tex / tex.std()).astype(np.float32) * self.on_disk
        self.texture = tex
        self.base = {}
        for ch, (quiet, limb, height, *_rest) in _AIA.items():
            tex_c = _AIA[ch][6]
            if limb >= 0:  # EUV: limb brightening, off-limb corona
                disk = 1 + limb * (1 - mu) ** 2
                edge = 1 + limb
            else:  # UV: limb darkening, barely anything above the limb
                disk = 1 + limb * (1 - mu)
                edge = 1 + limb
            corona = edge * np.exp(-np.clip(rho - 1, 0, None) / height)
            img = np.where(self.on_disk, disk * (1 + tex_c * tex), corona)
            self.base[ch] = (quiet * img).astype(np.float32)

    def _add_gaussian(
        self, img: np.ndarray, amp: float, xc: float, yc: float, sigma: float
    ) -> None:
        """``img: (H, W)`` += amp * exp(-r^2 / 2 sigma^2) around (xc, yc) in solar radii, windowed.

        ``xc`` is west (column ``c + xc * R``), ``yc`` north (row ``c + yc * R``: row 0 south).
        """
        if amp == 0:
            return
        c = (self.res - 1) / 2
        px, py = c + xc * self.radius, c + yc * self.radius
        w = 4 * sigma * self.radius + 1
        x0, x1 = max(int(px - w), 0), min(int(px + w) + 2, self.res)
        y0, y1 = max(int(py - w), 0), min(int(py + w) + 2, self.res)
        if x0 >= x1 or y0 >= y1:
            return
        s = sigma * self.radius
        gx = np.exp(-0.5 * ((np.arange(x0, x1) - px) / s) ** 2).astype(np.float32)
        gy = np.exp(-0.5 * ((np.arange(y0, y1) - py) / s) ** 2).astype(np.float32)
        img[y0:y1, x0:x1] += np.float32(amp) * np.outer(gy, gx)

    def _add_dipole_field(
        self, out: dict[str, np.ndarray], r: ActiveRegion, t: float, env: float
    ) -> None:
        """Add the AR's two polarities to ``Bx``, ``By``, ``Bz`` maps (HMI)."""
        lon = r.longitude(t)
        half = r.separation / 2
        tilt = math.radians(r.tilt)
        hemi = 1 if r.lat > 0 else -1
        sigma = math.radians(r.size)
        for sign, d in ((r.leading_sign, +1), (-r.leading_sign, -1)):
            # d = +1: the leading spot, to the west and closer to the equator (Joy's law)
            lat = r.lat - d * hemi * half * math.sin(tilt)
            x, y, z = self._vector(lat, lon + d * half * math.cos(tilt))
            if z <= 0:
                continue
            amp = sign * r.flux * env
            # Bz at the disk (line-of-sight-like), weakened towards the limb.
            self._add_gaussian(out["Bz"], amp * z, x, y, sigma)
            # Horizontal field: out of positive, into negative polarity.
            for comp, offset in (("Bx", 1), ("By", 1)):
                off = 0.6 * sigma
                dx, dy = (off, 0) if comp == "Bx" else (0, off)
                self._add_gaussian(out[comp], 0.5 * amp * offset, x + dx, y + dy, sigma)
                self._add_gaussian(out[comp], -0.5 * amp * offset, x - dx, y - dy, sigma)

    def activity(self, t: float) -> list[tuple[ActiveRegion, float, float, float, float]]:
        """Visible ARs at ``t``: (region, envelope x visibility, x, y, z)."""
        out = []
        for r in self.regions:
            env = r.envelope(t)
            if env < 1e-3:
                continue
            vis = self._visibility(r, t)
            if vis <= 0:
                continue
            x, y, z = self._vector(r.lat, r.longitude(t))
            out.append((r, env * vis, x, y, z))
        return out

    def flare_level(self, t: float) -> list[tuple[Flare, float]]:
        out = []
        for f in self.flares:
            if f.t_peak - 6 * f.rise < t < f.t_peak + 10 * f.decay:
                out.append((f, float(f.profile(t))))
        return out

    def degradation(self, channel: str, when: dt.datetime) -> float:
        years = (when - _DEG_EPOCH).total_seconds() / (365.25 * _DAY)
        return float(math.exp(-max(years, 0) / _AIA[channel][7]))

    # ---- rendering

    def _noise(self, shape_like: np.ndarray) -> np.ndarray:
        k, oy, ox = self.rng_noise.integers(0, [8, self.res, self.res])
        return self._noise_bank[k, oy : oy + self.res, ox : ox + self.res]

    def render_aia(
        self, channel: str, t: float, active: list | None = None
    ) -> tuple[np.ndarray, float]:
        """One AIA frame ``(H, W) float32`` in DN/s (degradation-corrected) and its EXPTIME.

        ``active`` is :meth:`activity` at (about) ``t``; the channels of one AIA cycle,
        seconds apart, share it.
        """
        quiet, _limb, _h, ar_gain, temp_exp, flare_gain, _tex, _tau = _AIA[channel]
        img = self.base[channel].copy()
        ars = {
            r.id: (r, w, x, y, z)
            for r, w, x, y, z in (active if active is not None else self.activity(t))
        }
        uv = channel in ("1600A", "1700A")
        for r, w, x, y, z in ars.values():
            amp = quiet * ar_gain * w * (r.flux / 1000) * r.temperature**temp_exp
            if uv:  # plage: photospheric, on the disk only
                if z > 0:
                    self._add_gaussian(img, amp * z, x, y, math.radians(r.separation) * 0.6)
            else:  # loops: extend above the limb
                self._add_gaussian(img, amp, x, y, math.radians(r.separation) * 0.9)
        exptime = AIA_EXPTIME[channel]
        for f, level in self.flare_level(t):
            if f.ar_id in ars:
                r, w, x, y, z = ars[f.ar_id]
                self._add_gaussian(img, quiet * flare_gain * f.magnitude * level, x, y, 0.02)
                if level * f.magnitude > 20 and not uv:
                    exptime = round(exptime / 3, 3)  # the AEC shortens exposures in big flares
        if uv:  # plage and flare ribbons are on the disk
            img = np.where(self.on_disk, img, self.base[channel])
        # Shot noise of 4096^2 level-1 pixels averaged down to this resolution.
        npix = (4096 / self.res) ** 2
        img += np.sqrt(np.maximum(img, 0) / (exptime * npix)) * self._noise(img)
        np.maximum(img, 0, out=img)
        return img, exptime

    def render_hmi(self, t: float) -> dict[str, np.ndarray]:
        """``{"Bx", "By", "Bz"}: (H, W) float32`` in Gauss, 0 off the disk."""
        out = {c: np.zeros((self.res, self.res), dtype=np.float32) for c in HMI_CHANNELS}
        out["Bz"] += 15 * self.texture  # quiet-Sun network
        for r, w, *_ in self.activity(t):
            self._add_dipole_field(out, r, t, w)
        for c in HMI_CHANNELS:
            out[c] += _HMI_NOISE_G[c] * self._noise(out[c])
            out[c] *= self.on_disk
        return out

    def eve_irradiance(self, t: np.ndarray) -> np.ndarray:
        """Disk-integrated MEGS-A lines ``(len(t), 39) float32`` in W m^-2 (no missing values)."""
        t = np.asarray(t, dtype=np.float64)
        act = np.zeros_like(t)
        coarse = np.arange(t.min(), t.max() + 600, 600.0)  # ARs change slowly: 10-min grid
        act_coarse = np.array(
            [sum(w * r.flux / 1000 for r, w, *_ in self.activity(s)) for s in coarse]
        )
        act = np.interp(t, coarse, act_coarse)
        flare = np.zeros_like(t)
        for f in self.flares:
            near = (t > f.t_peak - 6 * f.rise) & (t < f.t_peak + 10 * f.decay)
            flare[near] += f.magnitude * f.profile(t[near])
        out = np.empty((len(t), len(EVE_LINE_TABLE)), dtype=np.float32)
        for j, (_name, wl, logt) in enumerate(EVE_LINE_TABLE):
            base = 1e-4 * (1 + 0.3 * math.sin(wl))  # a fixed level per line
            hot = 1 / (1 + math.exp(-(logt - 6.6) * 6))  # hot lines respond to flares
            sig = base * (1 + 0.02 * (0.5 + hot) * act + 0.05 * (0.05 + hot) * flare)
            out[:, j] = sig * (1 + 0.01 * self.rng_eve.standard_normal(len(t)))
        return out


# --------------------------------------------------------------------------- the schedule


def _utc_to_tai_offset(when: dt.datetime) -> int:
    offset = 10
    for day, secs in LEAP_SECONDS:
        if when >= dt.datetime.fromisoformat(day):
            offset = secs
    return offset


def _nominal_steps(cfg: SynthConfig, cadence: dt.timedelta) -> list[dt.datetime]:
    steps: list[dt.datetime] = []
    for p in sorted(cfg.periods, key=lambda p: p.start):
        t = dt.datetime.combine(p.start, dt.time())
        end = t + dt.timedelta(days=p.days)
        while t < end:
            if not steps or t > steps[-1]:
                steps.append(t)
            t += cadence
    return steps


def _gap_mask(sun: SyntheticSun, steps: list[dt.datetime]) -> np.ndarray:
    """True where an instrument-wide gap (30 min .. 3 h) removes the step."""
    rng = sun.rng_gap
    n_gaps = rng.poisson(sun.cfg.gaps_per_day * sun.t_end / _DAY)
    t = np.array([(s - sun.epoch).total_seconds() for s in steps])
    gap = np.zeros(len(steps), dtype=bool)
    for _ in range(n_gaps):
        start = rng.uniform(0, sun.t_end)
        gap |= (t >= start) & (t < start + rng.uniform(1800, 10800))
    return gap


def _stored_order(sun: SyntheticSun, times: list[dt.datetime]) -> dict[str, list[int]]:
    """Per year, the step indices in stored order: days shuffled, each day in time order."""
    by_year: dict[str, dict[dt.date, list[int]]] = {}
    for i, t in enumerate(times):
        by_year.setdefault(str(t.year), {}).setdefault(t.date(), []).append(i)
    order: dict[str, list[int]] = {}
    for year, days in by_year.items():
        keys = sorted(days)
        perm = sun.rng_order.permutation(len(keys)) if len(keys) > 1 else [0]
        order[year] = [i for k in perm for i in days[keys[k]]]
    return order


def _fmt_aia(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 10000:02d}Z"


def _fmt_tai(t: dt.datetime) -> str:
    return t.strftime("%Y.%m.%d_%H:%M:%S_TAI")


# --------------------------------------------------------------------------- writing


def _compressor():
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


def create_frame_array(group, name: str, n_frames: int, size: int, frames_per_chunk: int):
    """The one way sdofm creates an SDOML image array: (N, H, W) float32, Blosc zstd 5 + bit-shuffle."""
    return group.create_array(
        name,
        shape=(n_frames, size, size),
        chunks=(frames_per_chunk, size, size),
        dtype="float32",
        compressors=_compressor(),
        fill_value=0.0,
        overwrite=True,
    )


class FrameWriter:
    """Appends frames and their per-frame headers to one SDOML channel array.

    The one writer of image arrays: the synthetic Sun and ``sdofm data ingest``
    both write through it. Frames ``(H, W) float32`` are buffered and written a
    whole chunk at a time (no read-modify-write), compressed on ``pool`` when one
    is given. Headers become per-frame lists in the array's ``.zattrs`` under
    upper-case keys (None where a frame lacks a key), written by :meth:`commit`
    after the pixels: the length of ``T_OBS`` is the number of committed frames,
    so an interrupted append leaves at most uncommitted frames past its end.

    An existing array is appended to; one with more frames than its ``T_OBS``
    list, or of another frame size or dtype, is a :class:`SDOMLError`.
    ``reserve`` frames are allocated at once (one metadata write instead of one
    per chunk); :meth:`close` trims what was not used.
    """

    def __init__(
        self, group, name: str, size: int, frames_per_chunk: int, pool=None, reserve: int = 0
    ):
        self.pool, self.size = pool, size
        where = f"{group.store_path}/{name}"
        if name in group:
            self.array = group[name]
            a = self.array
            if a.ndim != 3 or tuple(a.shape[1:]) != (size, size) or a.dtype != np.float32:
                raise SDOMLError(
                    f"{where}: cannot append {size}x{size} float32 frames to an array of shape "
                    f"{a.shape}, dtype {a.dtype}"
                )
            attrs = dict(a.attrs)
            committed = len(attrs["T_OBS"]) if isinstance(attrs.get("T_OBS"), list) else 0
            if a.shape[0] != committed:
                raise SDOMLError(
                    f"{where}: holds {a.shape[0]} frames but its T_OBS list has {committed} "
                    "entries; cannot tell which frames are real"
                )
            # Lists of the wrong length exist in the archive: align them to T_OBS.
            self.attrs = {
                k: (v + [None] * committed)[:committed]
                for k, v in attrs.items()
                if isinstance(v, list)
            }
        else:
            self.array = create_frame_array(group, name, reserve, size, frames_per_chunk)
            committed = 0
            self.attrs = {}
        self.k = self.array.chunks[0]
        self.capacity = committed + reserve
        self.written = committed  # frames whose pixels are stored (or queued)
        self.committed = committed  # frames whose headers are stored
        self.buf: list[np.ndarray] = []
        self.pending: list = []

    @property
    def n_frames(self) -> int:
        """Frames added so far, including those not yet written: the index of the next one."""
        return self.written + len(self.buf)

    def add(self, frame: np.ndarray, header: dict) -> None:
        """Append one frame ``(H, W)`` and its header (JSON-able values)."""
        if frame.shape != (self.size, self.size):
            raise ValueError(f"frame of shape {frame.shape}, expected ({self.size}, {self.size})")
        n = self.n_frames
        for key, value in header.items():
            lst = self.attrs.setdefault(key.upper(), [None] * n)
            lst.append(value)
        for lst in self.attrs.values():
            if len(lst) == n:  # a key this frame lacks
                lst.append(None)
        self.buf.append(np.asarray(frame, dtype=np.float32))
        if self.n_frames % self.k == 0:  # whole chunks, also after a partial one
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        n, block = len(self.buf), np.stack(self.buf)
        lo = self.written
        if lo + n > self.array.shape[0]:
            self._wait()  # no write may be in flight while the metadata changes
            self.array.resize((max(lo + n, self.capacity), self.size, self.size))
        if self.pool is None:
            self.array[lo : lo + n] = block
        else:
            while len(self.pending) >= 2:  # bound the memory held by queued chunks
                self.pending.pop(0).result()  # .result() also raises a failed write
            self.pending.append(self.pool.submit(self.array.__setitem__, slice(lo, lo + n), block))
        self.written += n
        self.buf = []

    def _wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def commit(self) -> None:
        """Write buffered pixels, then the header lists: the frames so far become part of the store."""
        self.flush()
        self._wait()
        # One metadata write (attrs.update writes once per key). An array is never
        # without its T_OBS list, even before its first frame.
        self.array.update_attributes(self.attrs or {"T_OBS": []})
        self.committed = self.written

    def close(self) -> None:
        """Commit and trim allocated frames that were never written."""
        self.flush()
        self._wait()
        if self.array.shape[0] != self.written:
            self.array.resize((self.written, self.size, self.size))
        self.commit()


def _frame_header(sun: SyntheticSun, instrument: str) -> dict:
    scale = SOLAR_RADIUS_ARCSEC / sun.radius
    c = (sun.res + 1) / 2  # FITS pixels are 1-based
    # Positive CDELT1/CDELT2, no rotation: west grows with the column and north with
    # the row (FITS order, row 0 south), as the pixels are rendered.
    return {
        "CRPIX1": c,
        "CRPIX2": c,
        "CDELT1": scale,
        "CDELT2": scale,
        "CRVAL1": 0.0,
        "CRVAL2": 0.0,
        "CUNIT1": "arcsec",
        "CUNIT2": "arcsec",
        "R_SUN": sun.radius,
        "RSUN_OBS": SOLAR_RADIUS_ARCSEC,
        "NAXIS1": sun.res,
        "NAXIS2": sun.res,
        "QUALITY": 0,
        "TELESCOP": "SDO/AIA" if instrument == "aia" else "SDO/HMI",
        "INSTRUME": "AIA_SYNTH" if instrument == "aia" else "HMI_SYNTH",
    }


def _write_images(
    sun: SyntheticSun,
    root: str,
    instrument: str,
    storage_options: dict | None,
    truth_rows: list,
    progress: Callable[[int], None] | None,
) -> dict[str, int]:
    cfg = sun.cfg
    cadence = cfg.aia_cadence if instrument == "aia" else cfg.hmi_cadence
    channels = AIA_CHANNELS if instrument == "aia" else HMI_CHANNELS
    steps = _nominal_steps(cfg, cadence)
    gap = _gap_mask(sun, steps)
    # Each channel misses its own frames: per-channel frame counts differ.
    missing = {c: sun.rng_gap.random(len(steps)) < cfg.missing_fraction for c in channels}
    if instrument == "hmi":  # the three components come from one inversion
        missing = {c: missing["Bx"] for c in channels}
    order = _stored_order(sun, steps)
    group = open_group(join_url(root, STORE_NAMES[instrument][0]), storage_options, mode="w")
    group.attrs.update({"sdofm_synthetic": True, "instrument": instrument.upper()})
    header = _frame_header(sun, instrument)
    counts: dict[str, int] = {}
    pool = ThreadPoolExecutor(1)
    for year, idx in order.items():
        ygroup = group.require_group(year)
        present = {c: [i for i in idx if not (gap[i] or missing[c][i])] for c in channels}
        writers = {
            c: FrameWriter(ygroup, c, sun.res, cfg.frames_per_chunk, pool, reserve=len(present[c]))
            for c in channels
        }
        for i in idx:
            if gap[i]:
                if progress:
                    progress(1)
                continue
            nominal = steps[i]
            t = (nominal - sun.epoch).total_seconds()
            if instrument == "aia":
                active = sun.activity(t)
            else:
                # HMI's 720-s vectors are centred 30 s before the grid time; T_OBS is TAI.
                hmi_utc = nominal - dt.timedelta(seconds=30)
                tai = hmi_utc + dt.timedelta(seconds=_utc_to_tai_offset(hmi_utc))
                maps = sun.render_hmi(t)
            for c in channels:
                if missing[c][i]:
                    continue
                if instrument == "aia":
                    jitter = (
                        int(sun.rng_order.integers(-3, 4)) * 10_000
                    )  # 10 ms steps: T_OBS precision
                    obs = nominal + dt.timedelta(seconds=_AIA_TIME_OFFSET_S[c], microseconds=jitter)
                    frame, exptime = sun.render_aia(c, (obs - sun.epoch).total_seconds(), active)
                    deg = sun.degradation(c, obs)
                    head = {
                        "T_OBS": _fmt_aia(obs),
                        "DATE-OBS": _fmt_aia(obs)[:-1],
                        "EXPTIME": exptime,
                        "WAVELNTH": AIA_WAVELENGTH[c],
                        "WAVEUNIT": "angstrom",
                        "DEG_COR": deg,
                        "PIXLUNIT": "DN/s",
                    }
                    utc = obs
                else:
                    frame = maps[c]
                    head = {
                        "T_OBS": _fmt_tai(tai),
                        "T_REC": _fmt_tai(
                            nominal + dt.timedelta(seconds=_utc_to_tai_offset(nominal))
                        ),
                        "PIXLUNIT": "Gauss",
                    }
                    utc = hmi_utc
                truth_rows.append(
                    (
                        instrument,
                        c,
                        year,
                        writers[c].n_frames,
                        np.datetime64(utc, "ns").astype(np.int64),
                    )
                )
                writers[c].add(frame, {**header, **head})
            if progress:
                progress(1)
        for c in channels:
            writers[c].close()
            counts[c] = counts.get(c, 0) + writers[c].written
    pool.shutdown()
    return counts


def _write_eve(sun: SyntheticSun, root: str, storage_options: dict | None) -> int:
    cfg = sun.cfg
    steps = _nominal_steps(cfg, cfg.eve_cadence)
    t = np.array([(s - sun.epoch).total_seconds() for s in steps])
    values = sun.eve_irradiance(t)
    rng = sun.rng_eve
    values[rng.random(len(t)) < cfg.eve_missing_fraction] = -1.0  # MEGS-A drops whole spectra
    values[rng.random(values.shape) < 1e-4] = -1.0  # and, rarely, single lines
    fe16_2 = [n for n, *_ in EVE_LINE_TABLE].index("Fe XVI_2")
    values[rng.random(len(t)) < 0.9, fe16_2] = -1.0  # mostly missing, as in the archive
    for _ in range(rng.poisson(0.5 * sun.t_end / _DAY)):  # whole-instrument outages
        start = rng.uniform(0, sun.t_end)
        values[(t >= start) & (t < start + rng.uniform(1800, 7200))] = -1.0
    root_group = open_group(join_url(root, STORE_NAMES["eve"][0]), storage_options, mode="w")
    root_group.attrs.update({"sdofm_synthetic": True, "instrument": "EVE"})
    g = root_group.require_group("MEGS-A")
    chunk = min(len(t), 1440 * 7)
    times = np.array([s.strftime("%Y-%m-%d %H:%M:%S.%f")[:23] for s in steps], dtype="<U23")
    g.create_array(
        "Time",
        shape=times.shape,
        chunks=(chunk,),
        dtype="<U23",
        compressors=_compressor(),
        overwrite=True,
    )[:] = times
    for j, (name, wl, logt) in enumerate(EVE_LINE_TABLE):
        a = g.create_array(
            name,
            shape=(len(t),),
            chunks=(chunk,),
            dtype="float32",
            compressors=_compressor(),
            fill_value=-1.0,
            overwrite=True,
        )
        a[:] = values[:, j]
        a.attrs.update({"ion": name.split("_")[0], "wavelength": f"{wl:.4f} nm", "logT": logt})
    return len(t)


def _truth(sun: SyntheticSun, cfg: Config) -> dict:
    return {
        "synth": dump_config(cfg.synth),
        "epoch": sun.epoch.isoformat(),
        "hale_north_leading_sign": _HALE_NORTH_LEADING,
        "disk_radius_px": sun.radius,
        "image_orientation": IMAGE_ORIENTATION,
        "active_regions": [asdict(r) for r in sun.regions],
        "flares": [
            {**asdict(f), "t_peak_utc": (sun.epoch + dt.timedelta(seconds=f.t_peak)).isoformat()}
            for f in sun.flares
        ],
        "degradation": {
            "model": "DEG_COR = exp(-years since 2010-05-01 / tau)",
            "tau_years": {c: v[7] for c, v in _AIA.items()},
        },
        "channel_response": {
            c: dict(
                zip(
                    ("quiet", "limb", "height", "ar", "temp_exp", "flare", "texture"),
                    v[:7],
                    strict=True,
                )
            )
            for c, v in _AIA.items()
        },
    }


def read_truth(root: str, storage_options: dict | None = None) -> dict | None:
    """The truth file written beside the stores, or None."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(join_url(root, TRUTH_FILE), **(storage_options or {}))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def read_truth_frames(root: str, storage_options: dict | None = None):
    """The generator's frame table: instrument, channel, year, index, time (UTC)."""
    import pandas as pd

    return pd.read_parquet(
        join_url(root, TRUTH_FRAMES_FILE), storage_options=storage_options or None
    )


def write_synthetic(cfg: Config, progress: Callable[[int, int], None] | None = None) -> SynthReport:
    """Write AIA, HMI and EVE stores under ``cfg.data.root`` plus the truth files.

    Reuses stores already written from the same synth settings; refuses to write
    over anything else unless ``synth.overwrite``. ``progress(done, total)`` is
    called as time steps are rendered.
    """
    import fsspec
    import pandas as pd

    root, opts = cfg.data.root, cfg.data.storage_options
    existing = read_truth(root, opts)
    wanted = dump_config(cfg.synth)
    # Stores written before the orientation was fixed (row 0 south) are not reused.
    same = (
        existing is not None
        and existing.get("image_orientation") == IMAGE_ORIENTATION
        and {**existing["synth"], "overwrite": None} == {**wanted, "overwrite": None}
    )
    if same and not cfg.synth.overwrite:
        return SynthReport(root=root, reused=True)
    fs, base = fsspec.core.url_to_fs(root, **opts)
    for inst in ("aia", "hmi", "eve"):
        p = base.rstrip("/") + "/" + STORE_NAMES[inst][0]
        if fs.exists(p) and not cfg.synth.overwrite:
            ours = fs.exists(p + "/.zattrs") and json.loads(fs.cat(p + "/.zattrs")).get(
                "sdofm_synthetic"
            )
            if not (ours and existing is None):  # an interrupted synthetic write may be replaced
                raise SDOMLError(
                    f"{root}/{STORE_NAMES[inst][0]} already exists and was not written with these "
                    "synth settings; set synth.overwrite=true or choose another data.root"
                )
        if fs.exists(p):
            fs.rm(p, recursive=True)
    truth_path = base.rstrip("/") + "/" + TRUTH_FILE
    if fs.exists(truth_path):
        fs.rm(truth_path)
    fs.makedirs(base, exist_ok=True)
    clear_header_cache()

    sun = SyntheticSun(cfg.synth)
    total = len(_nominal_steps(cfg.synth, cfg.synth.aia_cadence)) + len(
        _nominal_steps(cfg.synth, cfg.synth.hmi_cadence)
    )
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    rows: list = []
    report = SynthReport(root=root)
    report.frames.update(_write_images(sun, root, "aia", opts, rows, tick))
    report.frames.update(_write_images(sun, root, "hmi", opts, rows, tick))
    report.eve_rows = _write_eve(sun, root, opts)
    frames = pd.DataFrame(rows, columns=["instrument", "channel", "year", "index", "time_ns"])
    frames["time"] = pd.to_datetime(frames.pop("time_ns"), unit="ns", utc=True)
    frames.to_parquet(join_url(root, TRUTH_FRAMES_FILE), storage_options=opts or None, index=False)
    # The truth file goes last: its presence marks a complete write.
    with fs.open(truth_path, "w") as f:
        json.dump(_truth(sun, cfg), f, indent=1)
    return report


def ensure_data(cfg: Config, progress: Callable[[int, int], None] | None = None) -> bool:
    """Write the synthetic Sun on first use: when ``data.root`` is a local folder holding no
    SDOML store at all. -> True if it was written. A URL is never written to."""
    from sdofm.datasets.sdoml import find_store

    d = cfg.data
    if "://" in d.root or any(
        find_store(d.root, inst, name, d.storage_options)
        for inst, name in (("aia", d.aia_store), ("hmi", d.hmi_store))
    ):
        return False
    write_synthetic(cfg, progress)
    return True

"""Writing the synthetic Sun in the exact SDOML v2 layout, with its hidden truth beside it.

Layout quirks reproduced: year groups, per-channel frame counts and gaps, days
stored out of order inside a year (frames within a day in time order), per-frame
header lists in ``.zattrs``, AIA ``T_OBS`` in UTC with ``Z``, HMI ``T_OBS`` in TAI,
EVE ``Time`` strings and negative irradiance for missing data.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from sdofm.archive.synthetic.sun import (
    AIA_RESPONSE,
    DAY_S,
    HALE_NORTH_LEADING,
    NETWORK_RESPONSE,
    SyntheticSun,
)
from sdofm.archive.writer import FrameWriter, compressor
from sdofm.config import DataConfig, SynthConfig, dump_config
from sdofm.constants import (
    AIA_CHANNELS,
    AIA_WAVELENGTH,
    EVE_LINE_TABLE,
    HMI_CHANNELS,
    LEAP_SECONDS,
    SOLAR_RADIUS_ARCSEC,
)
from sdofm.datasets.sdoml import (
    STORE_NAMES,
    Archive,
    SDOMLError,
    clear_header_cache,
    find_store,
    open_group,
)
from sdofm.storage import join, open_url, read_json, write_atomic

IMAGE_ORIENTATION = "FITS order: row 0 south, north at the last row; column 0 east"

TRUTH_FILE = "synthetic_truth.json"
TRUTH_FRAMES_FILE = "synthetic_truth_frames.parquet"

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


@dataclass
class SynthReport:
    root: str
    frames: dict[str, int] = field(default_factory=dict)
    eve_rows: int = 0
    reused: bool = False


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
    n_gaps = rng.poisson(sun.cfg.gaps_per_day * sun.t_end / DAY_S)
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
    group = open_group(join(root, STORE_NAMES[instrument][0]), storage_options, mode="w")
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
    for _ in range(rng.poisson(0.5 * sun.t_end / DAY_S)):  # whole-instrument outages
        start = rng.uniform(0, sun.t_end)
        values[(t >= start) & (t < start + rng.uniform(1800, 7200))] = -1.0
    root_group = open_group(join(root, STORE_NAMES["eve"][0]), storage_options, mode="w")
    root_group.attrs.update({"sdofm_synthetic": True, "instrument": "EVE"})
    g = root_group.require_group("MEGS-A")
    chunk = min(len(t), 1440 * 7)
    times = np.array([s.strftime("%Y-%m-%d %H:%M:%S.%f")[:23] for s in steps], dtype="<U23")
    g.create_array(
        "Time",
        shape=times.shape,
        chunks=(chunk,),
        dtype="<U23",
        compressors=compressor(),
        overwrite=True,
    )[:] = times
    for j, (name, wl, logt) in enumerate(EVE_LINE_TABLE):
        a = g.create_array(
            name,
            shape=(len(t),),
            chunks=(chunk,),
            dtype="float32",
            compressors=compressor(),
            fill_value=-1.0,
            overwrite=True,
        )
        a[:] = values[:, j]
        a.attrs.update({"ion": name.split("_")[0], "wavelength": f"{wl:.4f} nm", "logT": logt})
    return len(t)


def _truth(sun: SyntheticSun) -> dict:
    return {
        "synth": dump_config(sun.cfg),
        "epoch": sun.epoch.isoformat(),
        "hale_north_leading_sign": HALE_NORTH_LEADING,
        "disk_radius_px": sun.radius,
        "image_orientation": IMAGE_ORIENTATION,
        "active_regions": [asdict(r) for r in sun.regions],
        "flares": [
            {**asdict(f), "t_peak_utc": (sun.epoch + dt.timedelta(seconds=f.t_peak)).isoformat()}
            for f in sun.flares
        ],
        "network": {
            "model": "s(t) = sum_k sin(2 pi t / period_k + phase_k) / sqrt(2), t in s since epoch",
            "periods_s": sun.network_periods.tolist(),
            "phases": sun.network_phases.tolist(),
            "aia_response": NETWORK_RESPONSE,
        },
        "degradation": {
            "model": "DEG_COR = exp(-years since 2010-05-01 / tau)",
            "tau_years": {c: v[7] for c, v in AIA_RESPONSE.items()},
        },
        "channel_response": {
            c: dict(
                zip(
                    ("quiet", "limb", "height", "ar", "temp_exp", "flare", "texture"),
                    v[:7],
                    strict=True,
                )
            )
            for c, v in AIA_RESPONSE.items()
        },
    }


def read_truth(root: str, storage_options: dict | None = None) -> dict | None:
    """The truth file written beside the stores, or None."""
    try:
        return read_json(join(root, TRUTH_FILE), storage_options)
    except FileNotFoundError:
        return None


def read_truth_frames(root: str, storage_options: dict | None = None):
    """The generator's frame table: instrument, channel, year, index, time (UTC)."""
    import pandas as pd

    return pd.read_parquet(join(root, TRUTH_FRAMES_FILE), storage_options=storage_options or None)


def write_synthetic(
    synth: SynthConfig,
    root: str,
    storage_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthReport:
    """Write AIA, HMI and EVE stores under ``root`` (a folder or fsspec URL) plus the truth files.

    Reuses stores already written from the same synth settings; refuses to write
    over anything else unless ``synth.overwrite``. ``progress(done, total)`` is
    called as time steps are rendered.
    """
    import pandas as pd

    opts = storage_options or {}
    existing = read_truth(root, opts)
    wanted = dump_config(synth)
    # Stores written before the orientation was fixed (row 0 south) are not reused. A
    # setting newer than the store's truth file is at its default there (new settings
    # default to the Sun as it was).
    written = {**dump_config(SynthConfig()), **(existing or {}).get("synth", {})}
    same = (
        existing is not None
        and existing.get("image_orientation") == IMAGE_ORIENTATION
        and {**written, "overwrite": None} == {**wanted, "overwrite": None}
    )
    if same and not synth.overwrite:
        return SynthReport(root=root, reused=True)
    fs, base = open_url(root, opts)
    for inst in ("aia", "hmi", "eve"):
        p = join(base, STORE_NAMES[inst][0])
        if fs.exists(p) and not synth.overwrite:
            ours = fs.exists(join(p, ".zattrs")) and json.loads(fs.cat(join(p, ".zattrs"))).get(
                "sdofm_synthetic"
            )
            if not (ours and existing is None):  # an interrupted synthetic write may be replaced
                raise SDOMLError(
                    f"{root}/{STORE_NAMES[inst][0]} already exists and was not written with these "
                    "synth settings; set synth.overwrite=true or choose another data.root"
                )
        if fs.exists(p):
            fs.rm(p, recursive=True)
    truth_path = join(base, TRUTH_FILE)
    if fs.exists(truth_path):
        fs.rm(truth_path)
    fs.makedirs(base, exist_ok=True)
    clear_header_cache()

    sun = SyntheticSun(synth)
    total = len(_nominal_steps(synth, synth.aia_cadence)) + len(
        _nominal_steps(synth, synth.hmi_cadence)
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
    frames.to_parquet(join(root, TRUTH_FRAMES_FILE), storage_options=opts or None, index=False)
    # The truth file goes last: its presence marks a complete write.
    write_atomic(fs, truth_path, json.dumps(_truth(sun), indent=1).encode())
    return report


def is_synthetic_default(data: DataConfig) -> bool:
    """Whether ``data.root`` is the built-in default (``data/synthetic``, relative to here)."""
    import os

    default = type(data).model_fields["root"].default
    return "://" not in data.root and os.path.abspath(data.root) == os.path.abspath(default)


def ensure_data(
    data: DataConfig, synth: SynthConfig, progress: Callable[[int, int], None] | None = None
) -> bool:
    """Write the synthetic Sun on first use, at the synthetic default root only. -> True if
    it was written.

    Any other root must hold the stores the config selects: a mistyped path or URL is a
    :class:`~sdofm.datasets.sdoml.LayoutError` naming what was looked for, never a
    silently fabricated Sun to train on. ``sdofm data synth`` writes one anywhere.
    """

    if is_synthetic_default(data) and not any(
        find_store(data.root, inst, name, data.storage_options)
        for inst, name in (("aia", data.aia_store), ("hmi", data.hmi_store))
    ):
        write_synthetic(synth, data.root, data.storage_options, progress)
        return True
    Archive.open(data)  # raises, naming the root and the store names it looked for
    return False

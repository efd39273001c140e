"""SDOML observation times: ``T_OBS`` strings of every format the archive mixes, to UTC.

AIA stamps frames in UTC, HMI in TAI (``2010.05.01_00:12:04_TAI``), EVE without a zone
(UTC); TAI is turned into UTC with the leap-second table of :mod:`sdofm.constants`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdofm.constants import LEAP_SECONDS

_T_RE = re.compile(
    r"^\s*(\d{4})[-.](\d{2})[-.](\d{2})[T _](\d{2}):(\d{2}):(\d{2}(?:\.\d*)?)\s*(Z|_?TAI|_?UTC)?\s*$"
)
_EPOCH = dt.date(1970, 1, 1)
_NS = 1_000_000_000
_LEAP_UTC_NS = np.array(
    [(dt.date.fromisoformat(d) - _EPOCH).days * 86400 * _NS for d, _ in LEAP_SECONDS],
    dtype=np.int64,
)
_LEAP_OFFSET_NS = np.array([s * _NS for _, s in LEAP_SECONDS], dtype=np.int64)
_LEAP_TAI_NS = _LEAP_UTC_NS + _LEAP_OFFSET_NS


def tai_to_utc(tai_ns: np.ndarray) -> np.ndarray:
    """TAI nanoseconds since 1970 -> UTC nanoseconds since 1970 (leap-second aware).

    ``tai_ns: (N,) int64 -> (N,) int64``. An instant inside a leap second
    (UTC 23:59:60.x) maps to 00:00:00.x of the next day.
    """
    # The leap second itself (TAI just before the new offset applies) keeps the old
    # offset and so lands on 00:00:00.x of the next UTC day.
    i = np.searchsorted(_LEAP_TAI_NS, tai_ns, side="right") - 1
    return tai_ns - _LEAP_OFFSET_NS[np.clip(i, 0, None)]


def parse_times(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Parse SDOML ``T_OBS`` strings into UTC.

    ``values: (N,)`` strings such as ``2010-08-01T00:00:09.57Z`` (AIA, UTC),
    ``2010.05.01_00:12:04_TAI`` (HMI, TAI) or ``2010-05-01 00:00:00.000`` (EVE);
    formats may be mixed, seconds may read ``60``.
    Returns ``(times: (N,) datetime64[ns], bad: (N,) bool)``; bad entries are NaT.
    """
    n = len(values)
    out = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    tai = np.zeros(n, dtype=bool)
    day_cache: dict[tuple[int, int, int], int] = {}
    for i, v in enumerate(values):
        m = _T_RE.match(v) if isinstance(v, str) else None
        if m is None:
            bad[i] = True
            continue
        y, mo, d, hh, mm = (int(m.group(k)) for k in range(1, 6))
        sec = float(m.group(6))
        key = (y, mo, d)
        days = day_cache.get(key)
        if days is None:
            try:
                days = (dt.date(y, mo, d) - _EPOCH).days
            except ValueError:
                bad[i] = True
                continue
            day_cache[key] = days
        if hh > 23 or mm > 59 or sec >= 61:
            bad[i] = True
            continue
        out[i] = days * 86400 * _NS + (hh * 3600 + mm * 60) * _NS + round(sec * _NS)
        tai[i] = "TAI" in (m.group(7) or "")
    if tai.any():
        out[tai] = tai_to_utc(out[tai])
    times = out.view("datetime64[ns]").copy()
    times[bad] = np.datetime64("NaT")
    return times, bad

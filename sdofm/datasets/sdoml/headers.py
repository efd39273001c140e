"""Per-frame headers: the few lists sdofm keeps of each array's ``.zattrs``, parsed once.

An SDOML array's ``.zattrs`` holds ~175 per-frame lists (up to ~221 MB of JSON in the
real archive); sdofm decodes only :data:`HEADER_KEYS` of it (:func:`parse_header`) and
keeps what it parsed for the life of the process (:func:`cached`,
:func:`clear_header_cache`), so every reader in a process downloads a header once.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdofm.datasets.sdoml.times import parse_times

HEADER_KEYS = ("T_OBS", "DEG_COR", "EXPTIME", "QUALITY")
"""The per-frame header keys sdofm keeps: the rest of a ``.zattrs`` (~175 keys) is never parsed."""


@dataclass
class Header:
    """What sdofm keeps of one array's ``.zattrs``: ``T_OBS`` as stored and the numeric keys
    of :data:`HEADER_KEYS` it has, each ``(len(list),) float64`` with NaN for nulls."""

    t_obs: list | None
    numbers: dict[str, np.ndarray]
    nbytes: int  # size of the .zattrs document


def _as_numbers(values: list) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = v
    return out


def parse_header(raw: bytes, keys: Sequence[str] = HEADER_KEYS) -> Header:
    """Keep ``keys`` of a ``.zattrs`` document (``T_OBS`` as stored, the rest as float64).

    A real ``.zattrs`` is up to ~221 MB of JSON: decoding all of its ~175 lists takes
    seconds and GBs of Python objects for the few sdofm uses. Each wanted list is
    decoded alone, from where its key stands (in JSON text an unescaped ``"KEY"``
    followed by ``:`` can only be an object key); a key found twice (a nested object)
    falls back to decoding the whole document.
    """
    text = raw.decode("utf-8")
    names = "|".join(re.escape(k) for k in keys)
    pattern = re.compile(rf'"({names})"\s*:\s*')
    where: dict[str, list[int]] = {}
    for m in pattern.finditer(text):
        where.setdefault(m.group(1), []).append(m.end())
    decoder = json.JSONDecoder()
    found: dict[str, Any] = {}
    if any(len(v) > 1 for v in where.values()):
        whole = json.loads(text)
        found = {k: whole[k] for k in keys if k in whole}
    else:
        for k, (pos,) in where.items():
            found[k] = decoder.raw_decode(text, pos)[0]
    t_obs = found.pop("T_OBS", None)
    numbers = {k: _as_numbers(v) for k, v in found.items() if isinstance(v, list)}
    return Header(t_obs=t_obs, numbers=numbers, nbytes=len(raw))


@dataclass
class FrameTimes:
    """Observation times of one array's frames, in stored order (not time order)."""

    times: np.ndarray  # (N,) datetime64[ns], NaT where the header is unusable
    problems: dict[str, list[int]] = field(default_factory=dict)  # reason -> frame indices

    @property
    def n_bad(self) -> int:
        return int(np.isnat(self.times).sum())


def parse_frame_times(t_obs: list, n: int) -> FrameTimes:
    """The times of an array's ``n`` frames from its ``T_OBS`` list. Entries that are null,
    unparseable or beyond the end of a too-short list are NaT and listed in ``problems``;
    a list longer than the array is cut."""
    problems: dict[str, list[int]] = {}
    if len(t_obs) != n:
        problems["header_length_mismatch"] = list(range(len(t_obs), n))
        t_obs = (t_obs + [None] * n)[:n]
    times, bad = parse_times(t_obs)
    nulls = [i for i in np.flatnonzero(bad) if t_obs[i] is None and i < n]
    nulls = [i for i in nulls if i not in set(problems.get("header_length_mismatch", []))]
    unparseable = [int(i) for i in np.flatnonzero(bad) if t_obs[i] is not None]
    if nulls:
        problems["header_null"] = [int(i) for i in nulls]
    if unparseable:
        problems["header_unparseable"] = unparseable
    return FrameTimes(times=times, problems=problems)


_HEADER_CACHE: dict[tuple, Any] = {}
_HEADER_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple, threading.Lock] = {}


def cached(key: tuple, make):
    """``make()`` once per process and key, also when threads ask at the same time."""
    with _HEADER_LOCK:
        if key in _HEADER_CACHE:
            return _HEADER_CACHE[key]
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:
        with _HEADER_LOCK:
            if key in _HEADER_CACHE:
                return _HEADER_CACHE[key]
        value = make()
        with _HEADER_LOCK:
            _HEADER_CACHE[key] = value
    return value


def clear_header_cache() -> None:
    """Forget parsed headers (after a store was rewritten in this process)."""
    with _HEADER_LOCK:
        _HEADER_CACHE.clear()
        _KEY_LOCKS.clear()

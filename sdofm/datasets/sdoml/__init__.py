"""The SDOML v2 archive, read-only: the AIA, HMI and EVE stores under one root (a folder or
any fsspec URL), their layout validated, headers read once, frames read a chunk at a time.

- :mod:`~sdofm.datasets.sdoml.stores`: finding and opening the stores, layout errors,
  reading frames (:class:`Archive`, :class:`ImageStore`, :class:`EVEStore`)
- :mod:`~sdofm.datasets.sdoml.headers`: the per-frame lists kept of each ``.zattrs``,
  parsed once per process
- :mod:`~sdofm.datasets.sdoml.times`: ``T_OBS`` strings to UTC (TAI and leap seconds)
- :mod:`~sdofm.datasets.sdoml.description`: what ``sdofm data info`` reports

Import from here: ``from sdofm.datasets.sdoml import Archive, LayoutError``.
"""

from sdofm.datasets.sdoml.description import describe, describe_eve_store, describe_image_store
from sdofm.datasets.sdoml.headers import (
    HEADER_KEYS,
    FrameTimes,
    Header,
    clear_header_cache,
    parse_header,
)
from sdofm.datasets.sdoml.stores import (
    INSTRUMENT_CHANNELS,
    STORE_NAMES,
    Archive,
    EVEStore,
    FrameError,
    ImageStore,
    LayoutError,
    ReadPolicy,
    SDOMLError,
    StoreUnreachableError,
    find_store,
    open_group,
)
from sdofm.datasets.sdoml.times import parse_times, tai_to_utc

__all__ = [
    "HEADER_KEYS",
    "INSTRUMENT_CHANNELS",
    "STORE_NAMES",
    "Archive",
    "EVEStore",
    "FrameError",
    "FrameTimes",
    "Header",
    "ImageStore",
    "LayoutError",
    "ReadPolicy",
    "SDOMLError",
    "StoreUnreachableError",
    "clear_header_cache",
    "describe",
    "describe_eve_store",
    "describe_image_store",
    "find_store",
    "open_group",
    "parse_header",
    "parse_times",
    "tai_to_utc",
]

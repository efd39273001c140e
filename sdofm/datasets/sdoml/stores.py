"""The AIA, HMI and EVE stores: found under a root, opened read-only, their layout
validated (:class:`LayoutError` naming every problem), frames read a chunk at a time.

One code path for a local folder, ``file://``, ``memory://``, anonymous ``s3://`` and
``gs://`` (any fsspec URL). Both namings are accepted: ``sdomlv2*.zarr`` (EVE under
``MEGS-A/``) and SDO-FM's mounted ``AIA.zarr`` / ``HMI.zarr`` / ``EVE_legacy.zarr``
(a flat EVE group).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from sdofm.constants import AIA_CHANNELS, HMI_CHANNELS
from sdofm.datasets.sdoml.headers import (
    HEADER_KEYS,
    FrameTimes,
    Header,
    cached,
    parse_frame_times,
    parse_header,
)
from sdofm.datasets.sdoml.times import parse_times
from sdofm.storage import join, open_url

STORE_NAMES: dict[str, tuple[str, ...]] = {
    "aia": ("sdomlv2.zarr", "sdomlv2_small.zarr", "AIA.zarr"),
    "hmi": ("sdomlv2_hmi.zarr", "sdomlv2_hmi_small.zarr", "HMI.zarr"),
    "eve": ("sdomlv2_eve.zarr", "EVE_legacy.zarr", "EVE.zarr"),
}
INSTRUMENT_CHANNELS = {"aia": AIA_CHANNELS, "hmi": HMI_CHANNELS}
_YEAR_RE = re.compile(r"^\d{4}$")


class SDOMLError(Exception):
    """Base of every error about the archive's content."""


class StoreUnreachableError(SDOMLError):
    """The store's URL cannot be opened (missing path, network error, no permission)."""


class LayoutError(SDOMLError):
    """A store does not have the SDOML v2 layout (or lacks what the config asks for)."""


class FrameError(SDOMLError):
    """One frame cannot be used: corrupt chunk, wrong shape, NaN.

    Carries where it happened so callers can skip and count it.
    """

    def __init__(self, store: str, year: str, channel: str, index: int, reason: str):
        self.store, self.year, self.channel, self.index, self.reason = (
            store,
            year,
            channel,
            index,
            reason,
        )
        super().__init__(f"{store} {year}/{channel} frame {index}: {reason}")

    def __reduce__(self):  # raised in Ray workers: rebuilt from its fields, not its message
        return (type(self), (self.store, self.year, self.channel, self.index, self.reason))


@dataclass(frozen=True)
class ReadPolicy:
    """How chunk reads meet a flaky network (``loader.read_retries``, ``read_timeout``,
    ``read_backoff``): each chunk GET is bounded in time and retried on a transient error
    (timeout, connection, HTTP 5xx) after a jittered, doubling pause."""

    retries: int = 3
    timeout: float = 120.0
    backoff: float = 0.2

    def pause(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (1, 2, ...): doubling, jittered, at most 10 s."""
        return min(10.0, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random())


def transient(e: BaseException) -> bool:
    """Whether a failed read may succeed when tried again (not a missing or forbidden object)."""
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    return isinstance(e, OSError | TimeoutError | ConnectionError)


# --------------------------------------------------------------------------- opening


def open_group(url: str, storage_options: dict | None = None, mode: str = "r"):
    """Open a zarr v2 group at a local path or fsspec URL; read-only unless ``mode='w'``."""
    import zarr
    from zarr.storage import FsspecStore, LocalStore

    read_only = mode == "r"
    try:
        if "://" not in url or url.startswith("file://"):
            path = url.removeprefix("file://")
            if read_only and not _exists_local(path):
                raise StoreUnreachableError(f"no store at {url}: the path does not exist")
            store = LocalStore(path, read_only=read_only)
        else:
            if read_only:
                _probe(url, storage_options)
            store = FsspecStore.from_url(
                url, read_only=read_only, storage_options=storage_options or {}
            )
        # Never a consolidated .zmetadata: it would hold every array's headers at once.
        return zarr.open_group(store, mode=mode, zarr_format=2, use_consolidated=False)
    except SDOMLError:
        raise
    except FileNotFoundError as e:
        raise StoreUnreachableError(f"no zarr group at {url}: {e}") from e
    except Exception as e:  # network, permission, DNS: say which URL
        raise StoreUnreachableError(f"cannot open {url}: {type(e).__name__}: {e}") from e


def _probe(url: str, storage_options: dict | None) -> None:
    """Fetch ``url``'s ``.zgroup`` once before zarr opens the group.

    zarr fetches several metadata objects at once; when the endpoint is unreachable the
    first failure abandons the other requests mid-flight, and at exit each prints an
    ``Exception ignored ... was created in a different Context`` traceback. One plain
    request fails alone, with the cause.
    """
    fs, path = open_url(url, storage_options)
    try:
        fs.cat_file(join(path, ".zgroup"))
    except FileNotFoundError:
        where = "the path does not exist" if not _exists(fs, path) else "it holds no .zgroup"
        raise StoreUnreachableError(f"no zarr group at {url}: {where}") from None
    except Exception as e:
        raise StoreUnreachableError(f"cannot open {url}: {type(e).__name__}: {e}") from e


def _exists(fs, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception:
        return False


def _exists_local(path: str) -> bool:
    import os

    return os.path.exists(path)


def find_store(
    root: str, instrument: str, name: str | None, storage_options: dict | None
) -> str | None:
    """The URL of ``instrument``'s store under ``root`` (explicit ``name`` or the known namings)."""
    if name is not None:
        return join(root, name)
    try:
        fs, path = open_url(root, storage_options)
        for candidate in STORE_NAMES[instrument]:
            if fs.exists(join(path, candidate, ".zgroup")):
                return join(root, candidate)
    except Exception as e:
        raise StoreUnreachableError(f"cannot list {root}: {type(e).__name__}: {e}") from e
    return None


# --------------------------------------------------------------------------- image stores


class ImageStore:
    """An AIA or HMI store: year groups of ``(N, H, W)`` float32 channel arrays."""

    def __init__(
        self,
        url: str,
        instrument: str,
        storage_options: dict | None = None,
        read_policy: ReadPolicy | None = None,
    ):
        if instrument not in INSTRUMENT_CHANNELS:
            raise ValueError(f"instrument must be aia or hmi, not {instrument!r}")
        self.url = url
        self.instrument = instrument
        self.storage_options = storage_options or {}
        self.read_policy = read_policy or ReadPolicy()
        self.group = open_group(url, self.storage_options)
        self._arrays: dict[tuple[str, str], Any] = {}
        self._scratch_buf: np.ndarray | None = None  # one decoded chunk, reused
        self._fs_root: tuple | None = None  # (fsspec filesystem, root path)
        self._chunk_fs: tuple | None = None  # the same, for chunk GETs (see _chunk_filesystem)
        self._listings: dict[str, list[str]] = {}
        self._check_is_sdoml()

    def __repr__(self) -> str:
        return f"ImageStore({self.instrument.upper()} {self.url})"

    def _check_is_sdoml(self) -> None:
        known = INSTRUMENT_CHANNELS[self.instrument]
        if not self.years:
            found = sorted(self.group.keys())[:10]
            raise LayoutError(
                f"{self.url} is not an SDOML {self.instrument.upper()} store: expected year groups "
                f"('2010/', '2011/', ...) holding channel arrays ({', '.join(known)}); "
                f"found {found or 'nothing'}"
            )
        year = self.years[0]
        if not any(c in known for c in self.channels(year)):
            raise LayoutError(
                f"{self.url} is not an SDOML {self.instrument.upper()} store: year {year} holds "
                f"{self.channels(year) or 'nothing'}, none of {', '.join(known)}"
            )

    def _list(self, path: str) -> list[str]:
        """Names of the folders directly under ``path`` (relative to the store), listed once."""
        if path not in self._listings:
            fs, root = self._filesystem()
            try:
                entries = fs.ls(join(root, path), detail=True)
            except FileNotFoundError:
                entries = []
            self._listings[path] = sorted(
                e["name"].rstrip("/").rsplit("/", 1)[-1]
                for e in entries
                if e.get("type") == "directory"
                and not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")
            )
        return self._listings[path]

    @cached_property
    def years(self) -> list[str]:
        return [k for k in self._list("") if _YEAR_RE.match(k)]

    def years_between(self, start: dt.datetime | None, end: dt.datetime | None) -> list[str]:
        """The years ``start`` .. ``end`` touch (None: open-ended); with both given, every year
        of the span, held by the store or not (a missing one is an error where it is read)."""

        def year(t: dt.datetime | None) -> int | None:
            if t is not None and t.tzinfo is not None:
                t = t.astimezone(dt.UTC)
            return None if t is None else t.year

        y0, y1 = year(start), year(end)
        if y0 is not None and y1 is not None:
            return [str(y) for y in range(y0, y1 + 1)]
        return [
            y for y in self.years if (y0 is None or int(y) >= y0) and (y1 is None or int(y) <= y1)
        ]

    def channels(self, year: str) -> list[str]:
        """The channel arrays of ``year`` (a listing: no array is opened)."""
        return self._list(year)

    def array(self, year: str, channel: str):
        """The zarr array of ``year/channel``, opened from its ``.zarray`` alone.

        zarr downloads and parses an array's whole ``.zattrs`` on every open, up to
        ~221 MB in the real archive; sdofm reads the headers it needs once per process
        (:meth:`frame_times`, :meth:`header`), so the array's ``attrs`` are empty here.
        """
        key = (year, channel)
        if key not in self._arrays:
            if year not in self.years:
                raise LayoutError(f"{self.url}: no year {year} (has {', '.join(self.years)})")
            if channel not in self.channels(year):
                raise LayoutError(
                    f"{self.url}: year {year} has no channel {channel} "
                    f"(has {', '.join(self.channels(year))})"
                )
            self._arrays[key] = self._open_array(f"{year}/{channel}")
        return self._arrays[key]

    def _open_array(self, path: str):
        import zarr
        from zarr.core.array import AsyncArray
        from zarr.storage import StorePath

        fs, root = self._filesystem()
        try:
            meta = json.loads(fs.cat_file(f"{root}/{path}/.zarray"))
        except FileNotFoundError:
            raise LayoutError(f"{self.url}: {path} is not a zarr v2 array (no .zarray)") from None
        except Exception as e:
            raise StoreUnreachableError(
                f"cannot read {self.url}/{path}/.zarray: {type(e).__name__}: {e}"
            ) from e
        store_path = StorePath(self.group.store, f"{self.group.path}/{path}".lstrip("/"))
        return zarr.Array(AsyncArray(metadata={**meta, "attributes": {}}, store_path=store_path))

    def raw_header(self, year: str, channel: str) -> Header:
        """The kept keys of ``year/channel``'s ``.zattrs``, downloaded and parsed once per process."""
        self.array(year, channel)  # names a missing year or channel

        def make() -> Header:
            fs, root = self._filesystem()
            try:
                raw = fs.cat_file(f"{root}/{year}/{channel}/.zattrs")
            except FileNotFoundError:
                raw = b"{}"
            except Exception as e:
                raise StoreUnreachableError(
                    f"cannot read {self.url}/{year}/{channel}/.zattrs: {type(e).__name__}: {e}"
                ) from e
            return parse_header(raw)

        return cached((self.url, year, channel, ".zattrs"), make)

    def validate(
        self, channels: Sequence[str], years: Sequence[str] | None = None
    ) -> tuple[int, int]:
        """Check that every (year, channel) exists with a consistent ``(N, H, W)`` shape.

        Returns the frame shape ``(H, W)``. Raises :class:`LayoutError` listing all problems.
        """
        problems: list[str] = []
        years = list(years) if years is not None else self.years
        missing_years = [y for y in years if y not in self.years]
        if missing_years:
            problems.append(
                f"missing year(s) {', '.join(missing_years)} (has {', '.join(self.years)})"
            )
        shapes: dict[tuple[int, int], list[str]] = {}
        for year in (y for y in years if y in self.years):
            have = self.channels(year)
            missing = [c for c in channels if c not in have]
            if missing:
                problems.append(
                    f"year {year} lacks channel(s) {', '.join(missing)} (has {', '.join(have)})"
                )
            for c in (c for c in channels if c in have):
                a = self.array(year, c)
                if a.ndim != 3:
                    problems.append(f"{year}/{c} has shape {a.shape}, expected (frames, H, W)")
                    continue
                if not np.issubdtype(a.dtype, np.floating):
                    problems.append(f"{year}/{c} has dtype {a.dtype}, expected float32")
                if self.raw_header(year, c).t_obs is None:
                    problems.append(f"{year}/{c} has no per-frame T_OBS attribute")
                shapes.setdefault(tuple(a.shape[1:]), []).append(f"{year}/{c}")
        if len(shapes) > 1:
            desc = "; ".join(
                f"{s}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for s, v in shapes.items()
            )
            problems.append(f"frames of different shapes: {desc}")
        if problems:
            raise LayoutError(f"{self.url}:\n  " + "\n  ".join(problems))
        return next(iter(shapes)) if shapes else (0, 0)

    def frame_times(self, year: str, channel: str) -> FrameTimes:
        """Parsed ``T_OBS`` of every frame of ``year/channel`` (cached per process).

        Frames whose entry is null, unparseable or beyond the end of a too-short
        list are NaT and listed in ``problems``; a list longer than the array is cut.
        """
        a = self.array(year, channel)

        def make() -> FrameTimes:
            raw = self.raw_header(year, channel).t_obs
            if not isinstance(raw, list):
                raise LayoutError(f"{self.url} {year}/{channel}: T_OBS is not a per-frame list")
            return parse_frame_times(raw, a.shape[0])

        return cached((self.url, year, channel, "T_OBS"), make)

    def header(self, year: str, channel: str, key: str) -> np.ndarray:
        """One numeric per-frame header of :data:`HEADER_KEYS` (``DEG_COR``, ``EXPTIME``,
        ``QUALITY``) as ``(N,) float64``, NaN where a frame has none."""
        if key not in HEADER_KEYS or key == "T_OBS":
            raise ValueError(f"sdofm keeps the numeric headers {HEADER_KEYS[1:]}, not {key!r}")
        n = self.array(year, channel).shape[0]
        values = self.raw_header(year, channel).numbers.get(key)
        if values is None:
            raise LayoutError(f"{self.url} {year}/{channel}: no per-frame attribute {key}")
        out = np.full(n, np.nan)
        out[: min(n, len(values))] = values[:n]
        return out

    def read_frames(
        self,
        year: str,
        channel: str,
        indices: Sequence[int],
        check: bool = True,
        out: np.ndarray | None = None,
        errors: dict[int, str] | None = None,
    ) -> np.ndarray:
        """Read frames ``indices`` of ``year/channel`` decoding each chunk once.

        ``-> (len(indices), H, W) float32`` in the order asked for. Any chunking is read:
        several frames per chunk, or tiles of frames (``(k, h, w)`` chunks). With
        ``check``, a frame that is not finite everywhere raises :class:`FrameError`.
        ``out``, a C-contiguous float32 array of that shape, is filled instead of a new
        array when the indices are sorted and unique (a reused buffer: no page faults).

        A chunk that cannot be fetched (after ``read_policy``'s retries) or decoded
        raises :class:`FrameError` naming its first frame; given an ``errors`` dict, its
        frames are NaN instead and ``errors[frame] = reason`` says why.
        """
        a = self.array(year, channel)
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return np.empty((0, *a.shape[1:]), dtype=np.float32)
        if idx.min() < 0 or idx.max() >= a.shape[0]:
            bad = int(idx[(idx < 0) | (idx >= a.shape[0])][0])
            raise FrameError(
                self.url, year, channel, bad, f"index out of range (0..{a.shape[0] - 1})"
            )
        uniq, inv = np.unique(idx, return_inverse=True)
        direct = len(uniq) == len(idx) and np.array_equal(uniq, idx)
        dest = (
            out if out is not None and direct else np.empty((len(uniq), *a.shape[1:]), np.float32)
        )
        if self._raw_codec(a) is not None:
            self._decode_chunks(year, channel, a, uniq, dest, errors)
        else:
            self._zarr_read(year, channel, a, uniq, dest, errors)
        out = dest if direct else dest[inv]
        if check:
            for j, i in enumerate(idx):
                reason = frame_problem(out[j])
                if reason:
                    raise FrameError(self.url, year, channel, int(i), reason)
        return out

    @staticmethod
    def _raw_codec(a):
        """The numcodecs compressor when chunks can be decoded without zarr (v2, C order,
        little-endian float32, no filters), else None."""
        m = a.metadata
        if getattr(m, "zarr_format", 3) != 2 or m.filters or m.order != "C":
            return None
        if (
            a.dtype != np.dtype("<f4")
            or m.compressor is None
            or not hasattr(m.compressor, "decode")
        ):
            return None
        return m.compressor

    def _decode_chunks(
        self, year: str, channel: str, a, frames: np.ndarray, out: np.ndarray, errors: dict | None
    ) -> None:
        """Fetch the chunks holding ``frames`` (sorted, unique) and decode each once into ``out``.

        zarr's own read path cost twice the CPU of the decode itself here (its async
        machinery and extra copies); a chunk of whole frames that are all wanted is
        decoded straight into ``out``, any other (a tile, a partly wanted chunk) into a
        scratch buffer reused between calls and copied from there.
        """
        codec = self._raw_codec(a)
        (ct, cy, cx), (_, h, w) = a.chunks, a.shape
        sep = a.metadata.dimension_separator or "."
        tiles = [(j, k) for j in range(-(-h // cy)) for k in range(-(-w // cx))]
        _, root = self._chunk_filesystem()
        chunk_ids = frames // ct
        keys = np.unique(chunk_ids)
        name = {(t, j, k): f"{t}{sep}{j}{sep}{k}" for t in keys for j, k in tiles}
        raw = self._fetch([f"{root}/{year}/{channel}/{n}" for n in name.values()])
        for t in keys:
            sel = np.flatnonzero(chunk_ids == t)
            span = f"frames {frames[sel[0]]}..{frames[sel[-1]]}"
            # Whole frames, all of the chunk's wanted, in order: decode in place.
            in_place = len(tiles) == 1 and len(sel) == ct and out.flags.c_contiguous
            for j, k in tiles:
                key = name[t, j, k]
                data = raw[f"{root}/{year}/{channel}/{key}"]
                y0, x0 = j * cy, k * cx
                y1, x1 = min(y0 + cy, h), min(x0 + cx, w)
                if isinstance(data, FileNotFoundError):  # never written: zarr's fill value
                    out[sel, y0:y1, x0:x1] = a.metadata.fill_value or 0.0
                    continue
                if isinstance(data, BaseException):
                    tries = self.read_policy.retries + 1 if transient(data) else 1
                    why = f"cannot fetch chunk {key} ({span}, {tries} attempt(s))"
                    self._unreadable(year, channel, frames[sel], out, sel, errors, why, data)
                    break
                target = out[sel[0] : sel[0] + ct] if in_place else self._scratch(a)
                try:
                    codec.decode(data, out=target)
                except Exception as e:
                    why = f"cannot decode chunk {key} ({span})"
                    self._unreadable(year, channel, frames[sel], out, sel, errors, why, e)
                    break
                if not in_place:
                    out[sel, y0:y1, x0:x1] = target[frames[sel] - t * ct, : y1 - y0, : x1 - x0]

    def _unreadable(self, year, channel, frames, out, sel, errors, why: str, e: BaseException):
        """Frames ``frames`` (at ``out[sel]``) of a chunk that failed: raise, or NaN and note why."""
        reason = f"{why}: {type(e).__name__}: {e}"
        if errors is None:
            raise FrameError(self.url, year, channel, int(frames[0]), reason) from e
        out[sel] = np.nan
        for i in frames:
            errors[int(i)] = reason

    def _fetch(self, paths: list[str]) -> dict[str, bytes | BaseException]:
        """The bytes of each path, or the error that ended its last attempt.

        Each GET is bounded by ``read_policy.timeout`` and retried on a transient error
        (:func:`transient`) up to ``read_policy.retries`` times after a growing pause.
        """
        policy, got, todo = self.read_policy, {}, list(paths)
        for attempt in range(policy.retries + 1):
            if attempt:
                time.sleep(policy.pause(attempt))
            got.update(self._cat(todo))
            todo = [p for p in todo if isinstance(got[p], BaseException) and transient(got[p])]
            if not todo:
                break
        return got

    def _cat(self, paths: list[str]) -> dict[str, bytes | BaseException]:
        """One attempt at each path, concurrently where the filesystem is asynchronous."""
        fs, _ = self._chunk_filesystem()
        if not getattr(fs, "async_impl", False):
            return {p: _cat_or_error(fs, p) for p in paths}
        import asyncio
        import inspect

        from fsspec.asyn import sync

        # s3fs would first HEAD each object to split large ones into ranged GETs.
        kw = (
            {"max_concurrency": 1}
            if "max_concurrency" in inspect.signature(fs._cat_file).parameters
            else {}
        )
        timeout = self.read_policy.timeout

        async def fetch_all():
            gate = asyncio.Semaphore(32)

            async def one(path):
                async with gate:
                    try:
                        return await asyncio.wait_for(fs._cat_file(path, **kw), timeout)
                    except TimeoutError:
                        return TimeoutError(f"no answer within {timeout:g} s")
                    except Exception as e:  # returned, like fs.cat(on_error="return")
                        return e

            return await asyncio.gather(*(one(p) for p in paths))

        return dict(zip(paths, sync(fs.loop, fetch_all), strict=True))

    def _scratch(self, a) -> np.ndarray:
        shape = tuple(a.chunks)
        if self._scratch_buf is None or self._scratch_buf.shape != shape:
            self._scratch_buf = np.empty(shape, np.float32)
        return self._scratch_buf

    def _filesystem(self):
        if self._fs_root is None:
            self._fs_root = open_url(self.url, self.storage_options)
        return self._fs_root

    def _chunk_filesystem(self):
        """The filesystem chunks are fetched with. On S3, botocore's and s3fs's own retries
        are off (unless ``storage_options`` sets them): :meth:`_fetch` retries, as
        ``loader.read_retries`` says, instead of up to 25 hidden attempts per GET.
        Headers and listings keep the library retries (:meth:`_filesystem`)."""
        if self._chunk_fs is None:
            fs, root = self._filesystem()
            protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
            if "s3" in protocols:
                opts = dict(self.storage_options)
                config = dict(opts.get("config_kwargs") or {})
                config.setdefault("retries", {"total_max_attempts": 1})
                opts["config_kwargs"] = config
                fs, _ = open_url(self.url, {**opts, "skip_instance_cache": True})
                fs.retries = 1  # s3fs's own loop (an instance of our own: not shared)
            self._chunk_fs = (fs, root)
        return self._chunk_fs

    def _zarr_read(
        self, year: str, channel: str, a, frames: np.ndarray, out: np.ndarray, errors: dict | None
    ) -> None:
        """Any other array: zarr's orthogonal selection, one chunk of frames at a time
        (a failure is then one chunk's), retried as :meth:`_fetch` retries."""
        from zarr.core.buffer.cpu import NDBuffer

        policy, ct = self.read_policy, a.chunks[0]
        chunk_ids = frames // ct
        for t in np.unique(chunk_ids):
            sel = np.flatnonzero(chunk_ids == t)
            part = np.empty((len(sel), *a.shape[1:]), np.float32)
            for attempt in range(policy.retries + 1):
                try:
                    a.get_orthogonal_selection(
                        (frames[sel], slice(None), slice(None)),
                        out=NDBuffer.from_numpy_array(part),
                    )
                    out[sel] = part
                    break
                except Exception as e:
                    if transient(e) and attempt < policy.retries:
                        time.sleep(policy.pause(attempt + 1))
                        continue
                    why = f"cannot read chunk {t} (frames {frames[sel[0]]}..{frames[sel[-1]]})"
                    self._unreadable(year, channel, frames[sel], out, sel, errors, why, e)
                    break

    def fingerprint(
        self, channels: Sequence[str] | None = None, years: Sequence[str] | None = None
    ) -> str:
        """A digest of the object metadata (size, ETag or modification time) of each array's
        ``.zarray`` and ``.zattrs`` in ``years``: no header is downloaded."""
        fs, root = self._filesystem()
        h = hashlib.sha256(self.url.encode())
        for year in years if years is not None else self.years:
            if year not in self.years:
                continue
            for c in channels if channels is not None else self.channels(year):
                if c not in self.channels(year):
                    continue
                for name in (".zarray", ".zattrs"):
                    try:
                        info = fs.info(f"{root}/{year}/{c}/{name}")
                    except FileNotFoundError:
                        info = {}
                    stamp = (
                        info.get("ETag")
                        or info.get("mtime")
                        or info.get("created")
                        or info.get("LastModified")
                    )
                    h.update(json.dumps([year, c, name, info.get("size"), str(stamp)]).encode())
        return h.hexdigest()[:16]


def _cat_or_error(fs, path: str):
    try:
        if isinstance(fs, LocalFileSystem):  # without fsspec's file object (its overhead)
            with open(path, "rb") as f:
                return f.read()
        return fs.cat_file(path)
    except Exception as e:  # returned, like fs.cat(on_error="return")
        return e


def frame_problem(frame: np.ndarray, shape: tuple[int, ...] | None = None) -> str | None:
    """Why a frame cannot be trained on, or None. ``frame: (H, W)``."""
    if shape is not None and frame.shape != tuple(shape):
        return f"wrong shape {frame.shape}, expected {tuple(shape)}"
    finite = np.isfinite(frame)
    if not finite.all():
        n = frame.size - int(finite.sum())
        return "all NaN" if n == frame.size else f"{n} non-finite pixel(s)"
    return None


# --------------------------------------------------------------------------- EVE


class EVEStore:
    """EVE MEGS-A line irradiances: ``Time`` strings and one (N,) float32 array per line."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = storage_options or {}
        root = open_group(url, self.storage_options)
        keys = set(root.keys())
        if "MEGS-A" in keys:
            self.group = root["MEGS-A"]
        elif "Time" in keys:
            self.group = root  # EVE_legacy.zarr: flat
        else:
            raise LayoutError(
                f"{url} is not an SDOML EVE store: expected 'MEGS-A/Time' (sdomlv2_eve.zarr) or "
                f"a flat 'Time' array (EVE_legacy.zarr); found {sorted(keys)[:10] or 'nothing'}"
            )

    def __repr__(self) -> str:
        return f"EVEStore({self.url})"

    @cached_property
    def lines(self) -> list[str]:
        return sorted(k for k, _ in self.group.arrays() if k != "Time")

    def validate(self, lines: Sequence[str]) -> None:
        missing = [ln for ln in lines if ln not in self.lines]
        if missing:
            raise LayoutError(
                f"{self.url}: missing EVE line(s) {', '.join(missing)} (has {len(self.lines)} lines)"
            )
        n = self.group["Time"].shape[0]
        wrong = [ln for ln in lines if self.group[ln].shape != (n,)]
        if wrong:
            raise LayoutError(
                f"{self.url}: EVE line(s) {', '.join(wrong)} do not have the shape of Time ({n},)"
            )

    def times(self) -> np.ndarray:
        """``(N,) datetime64[ns]`` UTC, NaT where unparseable (cached per process)."""

        def make() -> np.ndarray:
            raw = self.group["Time"][:]
            return parse_times([str(v) for v in raw])[0]

        return cached((self.url, "", "Time", "EVE"), make)

    def read(self, lines: Sequence[str], rows: np.ndarray | slice | None = None) -> np.ndarray:
        """``-> (len(rows), len(lines)) float32``; negative values mean missing (as stored)."""
        sel = slice(None) if rows is None else rows
        cols = []
        for ln in lines:
            a = self.group[ln]
            cols.append(
                a[sel] if isinstance(sel, slice) else a.get_orthogonal_selection((np.asarray(sel),))
            )
        return np.stack(cols, axis=1).astype(np.float32, copy=False)

    def fingerprint(self) -> str:
        fs, root = open_url(self.url, self.storage_options)
        info = fs.info(join(root, self.group.path, "Time", ".zarray"))
        t = self.group["Time"]
        stamp = (
            info.get("ETag") or info.get("mtime") or info.get("created") or info.get("LastModified")
        )
        return hashlib.sha256(
            json.dumps([self.url, t.shape, self.lines, str(stamp)]).encode()
        ).hexdigest()[:16]


# --------------------------------------------------------------------------- the archive


@dataclass
class Archive:
    """The AIA, HMI and EVE stores that one :class:`~sdofm.config.DataConfig` points at."""

    aia: ImageStore | None
    hmi: ImageStore | None
    eve: EVEStore | None

    @classmethod
    def open(
        cls,
        data_cfg,
        require: Sequence[str] | None = None,
        read_policy: ReadPolicy | None = None,
    ) -> Archive:
        """Open the stores the config selects; :class:`LayoutError` if one is missing.

        ``require`` defaults to what the config selects: AIA if it lists AIA
        channels, HMI if HMI channels, EVE if EVE lines. ``read_policy``: how the
        image stores retry frame reads (the loader's settings).
        """
        if require is None:
            require = [
                name
                for name, on in (
                    ("aia", data_cfg.aia_channels),
                    ("hmi", data_cfg.hmi_channels),
                    ("eve", data_cfg.eve_lines),
                )
                if on
            ]
        opts = data_cfg.storage_options
        stores: dict[str, Any] = {}
        for inst, name in (
            ("aia", data_cfg.aia_store),
            ("hmi", data_cfg.hmi_store),
            ("eve", data_cfg.eve_store),
        ):
            url = find_store(data_cfg.root, inst, name, opts)
            if url is None:
                if inst in require:
                    fs, path = open_url(data_cfg.root, opts)
                    raise LayoutError(
                        f"no {inst.upper()} store under {data_cfg.root} (looked for "
                        f"{', '.join(STORE_NAMES[inst])})"
                        + ("" if _exists(fs, path) else f": {data_cfg.root} does not exist")
                        + f"; set data.{inst}_store or data.root"
                        + (
                            f"; `sdofm data synth data.root={data_cfg.root}` writes the synthetic "
                            "Sun there"
                            if "://" not in data_cfg.root
                            else ""
                        )
                    )
                stores[inst] = None
                continue
            stores[inst] = (
                EVEStore(url, opts) if inst == "eve" else ImageStore(url, inst, opts, read_policy)
            )
        return cls(**stores)

"""The one way sdofm reaches a file or folder: a local path or any fsspec URL
(``file://``, ``memory://``, ``s3://bucket/prefix``, ``gs://...``).

Every function takes the URL and then ``storage_options``: the fsspec options of that
URL's filesystem (an S3-compatible ``endpoint_url`` and its keys, ``anon=True``), or None
for none. They always reach the filesystem; a local path's filesystem ignores the ones
it does not know, so a config's options for an object store are harmless on a folder.

Writes are atomic: a reader sees the old file or the whole new one, never part of it
(:func:`write_atomic`).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

StorageOptions = Mapping[str, Any] | None


def open_url(
    url: str | os.PathLike, storage_options: StorageOptions = None
) -> tuple[AbstractFileSystem, str]:
    """``url`` (a local path or fsspec URL) -> (its filesystem, the path on it), the path
    without a trailing slash (``"s3://b/runs/"`` -> ``"b/runs"``)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(os.fspath(url), **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def join(url: str | os.PathLike, *parts: str) -> str:
    """``parts`` under ``url``, one slash between each: ``join("s3://b/x/", "run/", "a")``
    -> ``"s3://b/x/run/a"``. A part that is itself a URL or an absolute path replaces what
    came before it (as :func:`os.path.join`): a store configured as ``/mnt/AIA.zarr`` or
    ``gs://...`` is found there, not under the root."""
    out = os.fspath(url)
    for part in parts:
        part = os.fspath(part)
        if "://" in part or part.startswith("/"):
            out = part
        elif part:
            out = (out if out.endswith("://") else out.rstrip("/") + "/") + part
    return out if out.endswith("://") else out.rstrip("/") or out


def is_local(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (where a rename is atomic)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on ``fs`` so that no reader ever sees part of it.

    On a local disk: a hidden temporary file beside ``path`` (its folder made if needed),
    renamed over it; if the write fails the temporary file is removed and ``path`` keeps
    what it held. Elsewhere: one PUT, which an object store applies whole or not at all.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm_file(tmp)
        raise


def read_bytes(url: str | os.PathLike, storage_options: StorageOptions = None) -> bytes:
    """The bytes of the file at ``url``; :class:`FileNotFoundError` when there is none."""
    fs, path = open_url(url, storage_options)
    return fs.cat_file(path)


def write_bytes(
    url: str | os.PathLike, data: bytes, storage_options: StorageOptions = None
) -> None:
    """Write the file at ``url`` atomically (:func:`write_atomic`)."""
    fs, path = open_url(url, storage_options)
    write_atomic(fs, path, data)


def read_json(url: str | os.PathLike, storage_options: StorageOptions = None) -> Any:
    """The JSON document at ``url``; :class:`FileNotFoundError` when there is none."""
    return json.loads(read_bytes(url, storage_options))


def write_json(
    url: str | os.PathLike, obj: Any, storage_options: StorageOptions = None, indent: int = 1
) -> None:
    """Write ``obj`` as a JSON document at ``url``, atomically."""
    write_bytes(url, json.dumps(obj, indent=indent).encode(), storage_options)


def exists(url: str | os.PathLike, storage_options: StorageOptions = None) -> bool:
    """Whether a file or folder is at ``url``."""
    fs, path = open_url(url, storage_options)
    return bool(fs.exists(path))


def listdir(url: str | os.PathLike, storage_options: StorageOptions = None) -> list[str]:
    """The names of the entries directly under the folder ``url``, sorted, as they are now
    (an object store's cached listing is dropped first); :class:`FileNotFoundError` when
    there is no such folder."""
    fs, path = open_url(url, storage_options)
    fs.invalidate_cache(path)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))

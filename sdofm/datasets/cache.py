"""The derived files in ``data.cache_dir`` (alignment index, statistics): a local folder, or
an object-store URL (``s3://bucket/sdofm/cache``) that every node reaches, so that a job on
any node finds what an earlier job on another node built.

A URL is reached with the credentials of the environment (instance profile, workload
identity, ``AWS_*`` variables), not with ``data.storage_options``: those are for the
archive, which is often a public bucket read anonymously.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_url(path: str) -> bool:
    return "://" in path


def cache_file(cache_dir: str, name: str) -> str:
    """``name`` in ``cache_dir``: a URL, or an absolute local path."""
    if is_url(cache_dir):
        return f"{cache_dir.rstrip('/')}/{name}"
    return str(Path(cache_dir).expanduser().resolve() / name)


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    try:
        return fs.cat_file(p)
    except FileNotFoundError:
        return None


def write_bytes(path: str, data: bytes) -> None:
    """Write ``path`` so that readers never see half of it: one PUT on an object store
    (which replaces whole objects), a temporary file and a rename on a local disk."""
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        fs.pipe_file(p, data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)

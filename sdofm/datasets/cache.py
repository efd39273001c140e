"""The derived files in ``data.cache_dir`` (alignment index, statistics): a local folder, or
an object-store URL (``s3://bucket/sdofm/cache``) that every node reaches, so that a job on
any node finds what an earlier job on another node built.

They are read and written with :mod:`sdofm.storage` without storage options: a URL is
reached with the credentials of the environment (instance profile, workload identity,
``AWS_*`` variables), not with ``data.storage_options``: those are for the archive, which
is often a public bucket read anonymously.
"""

from __future__ import annotations

from pathlib import Path

from sdofm.storage import join


def cache_file(cache_dir: str, name: str) -> str:
    """``name`` in ``cache_dir``: a URL, or an absolute local path."""
    if "://" in cache_dir:
        return join(cache_dir, name)
    return str(Path(cache_dir).expanduser().resolve() / name)

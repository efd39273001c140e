"""The test S3 endpoint itself: moto over HTTP, anonymous reads, counting and faults."""

from __future__ import annotations

import fsspec
import pytest

from tests.s3 import storage_options


def test_s3_endpoint_serves_anonymous_reads_counts_and_fails(s3_server, s3_proxy, tmp_path):
    body = bytes(range(256)) * 40
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.bin").write_bytes(body)
    s3_server.create_bucket("endpoint-check", public=True)
    assert s3_server.upload_tree(tmp_path / "a", "endpoint-check", "root") == 1

    fs = fsspec.filesystem(
        "s3", skip_instance_cache=True, **storage_options(s3_proxy.url, anon=True)
    )
    assert fs.cat("endpoint-check/root/b/x.bin") == body
    assert fs.cat_file("endpoint-check/root/b/x.bin", start=10, end=20) == body[10:20]
    gets = s3_proxy.gets("b/x.bin")
    assert len(gets) == 2 and gets[1].bytes_out == 10

    s3_proxy.faults.rate, s3_proxy.faults.match = 1.0, "x.bin"
    failing = fsspec.filesystem(
        "s3",
        skip_instance_cache=True,
        config_kwargs={"retries": {"max_attempts": 1}},
        **storage_options(s3_proxy.url, anon=True),
    )
    with pytest.raises(OSError):
        failing.cat("endpoint-check/root/b/x.bin")
    assert [r.status for r in s3_proxy.gets("b/x.bin")][2:] and all(
        r.status == 503 for r in s3_proxy.gets("b/x.bin")[2:]
    )

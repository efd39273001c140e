"""The test S3 endpoint itself: moto over HTTP, anonymous reads, counting and faults."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from tests.s3 import storage_options

REPO = Path(__file__).resolve().parents[1]


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


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _servers_on(port: int) -> list[int]:
    """Pids of the moto_server processes listening on ``port``, from /proc."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"moto_server") for a in args) and str(port).encode() in args:
            pids.append(int(cmdline.parent.name))
    return [p for p in pids if _alive(p)]


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_no_moto_server_outlives_the_session_that_started_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A pytest session that ends normally: the session fixture stops its server.
    test = "tests/test_s3_endpoint.py::test_s3_endpoint_serves_anonymous_reads_counts_and_fails"
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test,
         f"--basetemp={tmp_path / 'inner'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert inner.returncode == 0, inner.stdout + inner.stderr
    (log,) = (tmp_path / "inner").glob("moto[0-9]*/moto.log")
    port = int(re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())[1])
    assert _servers_on(port) == []
    # A session killed outright (SIGKILL: no teardown, no atexit) takes its server along.
    script = "from tests.s3 import MotoServer; import time; s = MotoServer().start(); "
    script += "print(s.proc.pid, s.port, flush=True); time.sleep(120)"
    owner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        pid, port = map(int, owner.stdout.readline().split())
        assert _alive(pid) and _servers_on(port) == [pid]
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert _gone(pid), f"moto_server {pid} outlived the process that started it"
    finally:
        owner.kill()
        owner.wait()

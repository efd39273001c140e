"""A real S3 endpoint for the tests: moto's server on 127.0.0.1, and a proxy in front of it.

The server is a separate process (``moto_server``) spoken to over HTTP, so sdofm
reaches it exactly as it reaches the public bucket: through s3fs with
``data.storage_options``. The :class:`Proxy` forwards every request to the server
and records what went over the wire (method, key, bytes sent back), and can fail or
stall a share of GETs to drill retries.
"""

from __future__ import annotations

import atexit
import http.client
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

KEY = "testing"
SECRET = "testing"
REGION = "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto_server did not listen on {host}:{port} within {timeout:.0f} s")


# Run in the child before moto_server replaces it: on Linux the kernel sends SIGKILL to
# the server when the process that started it dies, however it dies (a pytest killed by
# `timeout` or SIGKILL runs no fixture teardown and no atexit hook), and the setting
# survives the exec. argv: parent pid, then the server's command line.
_LAUNCH = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: stop() and atexit remain
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the parent died before prctl: nobody will stop the server
os.execv(sys.argv[2], sys.argv[2:])
"""


class MotoServer:
    """``moto_server`` in its own process group, stopped by pid, and killed by the kernel
    when the process that started it dies (start it from a thread that outlives it, as
    pytest's main thread does: the death signal follows the starting thread)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.public: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> MotoServer:
        exe = Path(sys.executable).with_name("moto_server")
        exe = str(exe) if exe.exists() else shutil.which("moto_server")
        if exe is None:
            raise RuntimeError("moto_server not found: install moto[server]")
        server = [exe, "-H", self.host, "-p", str(self.port)]
        cmd = [sys.executable, "-c", _LAUNCH, str(os.getpid()), *server]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if self.log:
                out.close()  # the child holds its own copy
        atexit.register(self.stop)  # a session that exits without its fixture teardown
        try:
            _wait_listening(self.host, self.port, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to the server's pid, then SIGKILL if it has not exited within 10 s;
        returns once it is reaped."""
        if self.proc is None:
            return
        atexit.unregister(self.stop)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # ------------------------------------------------------------------ buckets

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )

    def create_bucket(self, bucket: str, public: bool = False) -> None:
        """A bucket (``create_bucket`` without a location constraint, which moto rejects).

        ``public``: anonymous reads, as on the public SDOML bucket (objects uploaded
        by :meth:`upload_tree` are then public-read too).
        """
        c = self.client()
        if public:
            c.create_bucket(Bucket=bucket, ACL="public-read")
            self.public.add(bucket)
        else:
            c.create_bucket(Bucket=bucket)

    def upload_tree(self, local: Path | str, bucket: str, prefix: str) -> int:
        """Copy every file under ``local`` to ``s3://bucket/prefix/...``; the number of files."""
        from concurrent.futures import ThreadPoolExecutor

        c = self.client()
        local = Path(local)
        extra = {"ACL": "public-read"} if bucket in self.public else {}
        paths = sorted(p for p in local.rglob("*") if p.is_file())

        def put(path: Path) -> None:
            key = prefix.strip("/") + "/" + path.relative_to(local).as_posix()
            c.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), **extra)

        with ThreadPoolExecutor(8) as pool:  # one request at a time took ~30 ms a file
            list(pool.map(put, paths))
        return len(paths)


def storage_options(endpoint: str, anon: bool = False) -> dict:
    """s3fs options that reach ``endpoint`` (the same keys a user sets in ``data.storage_options``)."""
    opts: dict = {"client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}}
    if anon:
        opts["anon"] = True
    else:
        opts.update(key=KEY, secret=SECRET)
    return opts


# --------------------------------------------------------------------------- the proxy


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    status: int
    bytes_out: int
    range: str | None = None


@dataclass
class Faults:
    """Fail (HTTP 503) or stall a share of GETs whose key contains ``match``."""

    rate: float = 0.0
    mode: str = "error"  # "error" | "stall"
    stall_s: float = 5.0
    match: str = ""
    seed: int = 0
    rng: random.Random = field(init=False)
    stalled: list[str] = field(default_factory=list)
    """Keys of the GETs stalled so far, recorded as each stall begins."""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


class Proxy:
    """A counting, fault-injecting HTTP proxy in front of an S3 endpoint (path-style URLs)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        self.upstream = urlsplit(upstream)
        self.host = host
        self.requests: list[Request] = []
        self.faults = Faults()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                path = urlsplit(self.path).path
                parts = unquote(path).lstrip("/").split("/", 1)
                bucket, key = parts[0], (parts[1] if len(parts) > 1 else "")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                f = proxy.faults
                if (
                    self.command == "GET"
                    and f.rate > 0
                    and f.match in key
                    and key
                    and f.rng.random() < f.rate
                ):
                    if f.mode == "stall":
                        with proxy._lock:
                            f.stalled.append(key)
                        time.sleep(f.stall_s)
                    else:
                        msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(msg)))
                        self.send_header("Content-Type", "application/xml")
                        self.end_headers()
                        self.wfile.write(msg)
                        proxy._record(Request(self.command, bucket, key, 503, 0))
                        return
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "transfer-encoding")
                }
                headers["Host"] = f"{proxy.upstream.hostname}:{proxy.upstream.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                proxy._record(
                    Request(
                        self.command,
                        bucket,
                        key,
                        resp.status,
                        len(data) if self.command != "HEAD" else 0,
                        self.headers.get("Range"),
                    )
                )

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _record(self, r: Request) -> None:
        with self._lock:
            self.requests.append(r)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.faults = Faults()

    def gets(self, suffix: str = "") -> list[Request]:
        """The GETs so far whose key ends with ``suffix``."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.key.endswith(suffix)]

    def bytes_out(self) -> int:
        with self._lock:
            return sum(r.bytes_out for r in self.requests)

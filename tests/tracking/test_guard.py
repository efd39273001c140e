"""The one guarded MLflow call: an unreachable or failing store is a warning and a default,
within seconds, and the process's environment is left alone."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sdofm.tracking import guarded, start_run
from sdofm.tracking.guard import check_reachable


class Down(BaseHTTPRequestHandler):
    """A proxy whose tracking server is gone: 503 for everything."""

    def do_GET(self):
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy_of_a_dead_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_refused_connection_is_a_warning_and_the_default_within_seconds():
    before = dict(os.environ)
    calls = []
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="could not tag a run: .*does not answer"):
        got = guarded("http://127.0.0.1:9", "tag a run", calls.append, default="kept")
    with pytest.warns(UserWarning, match="cannot be reached"):
        assert start_run("http://127.0.0.1:9", "exp", "r", "/s", {}) is None
    assert got == "kept" and calls == []  # the call itself was never made
    assert time.perf_counter() - t0 < 10
    assert dict(os.environ) == before  # no MLflow setting changed for the user's process


def test_a_proxy_answering_5xx_counts_as_unreachable(proxy_of_a_dead_server):
    with pytest.raises(ConnectionError, match="503"):
        check_reachable(proxy_of_a_dead_server)
    errors = []
    assert guarded(proxy_of_a_dead_server, "x", lambda c: 1, default=0, on_error=errors.append) == 0
    assert isinstance(errors[0], ConnectionError)


def test_local_stores_are_not_probed_and_a_failing_call_is_guarded(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    check_reachable(uri)  # nothing to ask: a local store fails at once by itself
    assert guarded(uri, "list", lambda c: c.search_experiments()[0].name) == "Default"

    def refused(client):
        raise RuntimeError("RESOURCE_DOES_NOT_EXIST")

    with pytest.warns(UserWarning, match="could not read a run: RESOURCE_DOES_NOT_EXIST"):
        assert guarded(uri, "read a run", refused, default=False) is False

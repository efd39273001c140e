"""One way to call MLflow so that it never stops the work.

:func:`guarded` runs one call against a tracking store; any failure (an unreachable
server, a refused call) is a warning (or the caller's ``on_error``) and a default value,
never an exception. A server that does not answer costs seconds, not MLflow's minutes of
HTTP retries: an http(s) store is asked once for its ``/health`` page, with a short
timeout, before the call. MLflow's own retry settings are left as the user set them
(training workers get bounded ones, :func:`bound_http_retries`).
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

PROBE_TIMEOUT = 5.0
"""Seconds an http(s) tracking server has to answer its ``/health`` page."""

BOUNDED_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""MLflow's HTTP limits in a training worker, where the user set none: a server that dies
between the probe and a call costs seconds (MLflow's defaults retry for minutes, also in
the system-metrics thread)."""


def bound_http_retries() -> None:
    """Apply :data:`BOUNDED_HTTP` to this process: a training worker's, once, before any
    MLflow client or thread of it exists (MLflow reads these from the environment only);
    never the user's driver."""
    for k, v in BOUNDED_HTTP.items():
        os.environ.setdefault(k, v)


def check_reachable(uri: str) -> None:
    """Raise :class:`ConnectionError` within :data:`PROBE_TIMEOUT` seconds when the http(s)
    tracking server ``uri`` does not answer, or answers that it is down (5xx from a proxy
    in front of it). Other stores (sqlite, files) are local and fail at once by themselves."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError as e:  # it answered: only "down" counts
        if e.code >= 500:
            raise ConnectionError(f"{uri} answers {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return  # it answered; MLflow's own TLS settings decide the call itself
        raise ConnectionError(f"{uri} does not answer ({e.reason})") from None
    except OSError as e:  # a timeout or a reset while reading the answer
        raise ConnectionError(f"{uri} does not answer ({type(e).__name__}: {e})") from None


def guarded(
    uri: str,
    what: str,
    fn: Callable[[Any], T],
    default: Any = None,
    on_error: Callable[[Exception], None] | None = None,
) -> T | Any:
    """``fn(client)`` with the MLflow client of ``uri`` -> its value; or, when the store
    cannot be reached or the call fails, ``default`` after ``on_error(e)`` (by default the
    warning "could not {what}: {e}")."""
    from mlflow import MlflowClient  # cheap after the first: MLflow keeps one store per URI

    try:
        check_reachable(uri)
        return fn(MlflowClient(uri))
    except Exception as e:  # noqa: BLE001 - any failure of the store is the same to a user
        if on_error is None:
            warnings.warn(f"could not {what}: {e}", stacklevel=3)
        else:
            on_error(e)
        return default


def ignore(error: Exception) -> None:
    """An ``on_error`` for calls whose failure needs no word (the caller has a fallback)."""

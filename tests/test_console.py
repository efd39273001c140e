"""The console: where sdofm's warnings and everyone else's go, and the one private Ray API
sdofm patches (checked here so that a Ray upgrade that changes it fails loudly)."""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest

from sdofm import console


@pytest.fixture
def restore_logging():
    """The process's logging as it was: ``to_file`` changes it for the rest of a process."""
    root = logging.getLogger()
    captured = logging.getLogger("py.warnings")
    saved = (list(root.handlers), root.level, list(captured.handlers), console._log_file)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
        logging.captureWarnings(False)
    root.handlers[:], captured.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    console._log_file = saved[3]


@pytest.mark.usefixtures("restore_logging")
def test_sdofm_warnings_stay_on_the_console_and_the_others_go_to_the_log_file(tmp_path, capsys):
    path = tmp_path / "logs" / "sdofm.log"
    handler = console.to_file(path)
    own = console.__file__
    library = "/usr/lib/python3/site-packages/somelib/core.py"
    warnings.warn_explicit("ours: a tracking store cannot be reached", UserWarning, own, 1)
    warnings.warn_explicit("theirs: a deprecated call", DeprecationWarning, library, 7)
    logging.getLogger("somelib").warning("a library's log line")
    handler.flush()
    err = capsys.readouterr().err
    text = path.read_text()
    assert console.log_file() == path
    assert "ours: a tracking store cannot be reached" in err
    assert "theirs" not in err and "a library's log line" not in err
    assert "theirs: a deprecated call" in text and "a library's log line" in text
    assert f"{library}:7: DeprecationWarning" in text


def test_the_one_private_ray_api_sdofm_patches_is_still_there():
    """``console.raylet_lines_to`` replaces ``ray._private.worker.print_to_stdstream``: Ray's
    driver prints the raylet's messages through that module-level name (no public setting
    or logger reaches them). When this fails, Ray changed it: find the new route, or drop
    the patch."""
    from ray._private import worker

    params = list(inspect.signature(worker.print_to_stdstream).parameters)
    assert params == ["data", "ignore_prefix"]
    # Looked up by name at each call, so that replacing the module attribute takes effect.
    assert "print_to_stdstream" in worker.listen_error_messages.__code__.co_names
    assert '"pid": "raylet"' in inspect.getsource(worker.listen_error_messages)


def test_raylet_lines_go_to_the_log_and_memory_warnings_stay_live(monkeypatch):
    from ray._private import worker

    printed = []
    monkeypatch.setattr(
        worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data)
    )
    kept = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    console.raylet_lines_to(Keep())
    started = {"pid": "raylet", "lines": ["3 PYTHON worker processes have been started"]}
    oom = {"pid": "raylet", "lines": ["a worker was killed: out of memory"]}
    other = {"pid": 123, "lines": ["a worker's line"]}
    for data in (started, oom, other):
        worker.print_to_stdstream(data, ignore_prefix=False)
    assert kept == ["3 PYTHON worker processes have been started"]
    assert printed == [oom, other]


def test_say_prints_a_progress_line_without_ray(capfd):
    console.say("step 3 | loss 0.5")
    assert "[sdofm] step 3 | loss 0.5" in capfd.readouterr().out

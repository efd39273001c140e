"""The test tiers: a test that starts Ray must say so with the ``ray`` marker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASE = """
import ray
import pytest

def test_forgets_the_marker():
    ray.init(num_cpus=1)

@pytest.mark.ray
def test_carries_it():
    import os
    assert os.environ.get("RAY_ADDRESS") != "127.0.0.1:9"
"""


def test_a_test_that_starts_ray_without_the_marker_fails(tmp_path):
    case = REPO / "tests" / f"test_zz_marker_case_{tmp_path.name}.py"
    case.write_text(CASE)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(case)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # ours is set
        )
    finally:
        case.unlink()
    assert "1 failed, 1 passed" in out.stdout, out.stdout[-2000:]
    assert "starts Ray without the `ray` marker" in out.stdout

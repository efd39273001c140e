"""Figures: plain matplotlib; importing the tracking package costs no MLflow, torch or
matplotlib, so objectives and tasks import it at the top."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from sdofm.tracking import reconstruction_figure, samples_figure


def test_importing_tracking_imports_no_heavy_library():
    code = (
        "import sys, sdofm.tracking; "
        "print(sorted(m for m in ('mlflow', 'torch', 'matplotlib', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_figures_have_a_row_per_channel():
    img = np.random.default_rng(0).normal(size=(2, 8, 8))
    fig = reconstruction_figure(img, None, img, ["171A", "Bz"], title="t")
    assert np.asarray(fig.axes).size == 2 * 3  # input, reconstruction, |error|
    fig = samples_figure(np.stack([img] * 4), ["171A", "Bz"])
    assert np.asarray(fig.axes).size == 2 * 4

"""Scoring generated Suns without an ImageNet network: features read from frames
(``features``), distances between sets of frames (``metrics``), deliberate corruptions of
real frames (``corruptions``) and every metric calibrated against them (``calibration``).
Plain numpy and PyTorch, no Ray."""

from sdofm.generation.calibration import Calibration, Calibrator, summary_rows
from sdofm.generation.corruptions import CORRUPTIONS, applicable
from sdofm.generation.features import Summary, summarise
from sdofm.generation.metrics import scores

__all__ = [
    "CORRUPTIONS",
    "Calibration",
    "Calibrator",
    "Summary",
    "applicable",
    "scores",
    "summarise",
    "summary_rows",
]

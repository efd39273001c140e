"""The synthetic Sun: ``sun`` renders it, ``write`` writes it in the SDOML v2 layout."""

from sdofm.archive.synthetic.sun import ActiveRegion, Flare, SyntheticSun
from sdofm.archive.synthetic.write import (
    IMAGE_ORIENTATION,
    TRUTH_FILE,
    TRUTH_FRAMES_FILE,
    SynthReport,
    ensure_data,
    is_synthetic_default,
    read_truth,
    read_truth_frames,
    write_synthetic,
)

__all__ = [
    "IMAGE_ORIENTATION",
    "TRUTH_FILE",
    "TRUTH_FRAMES_FILE",
    "ActiveRegion",
    "Flare",
    "SynthReport",
    "SyntheticSun",
    "ensure_data",
    "is_synthetic_default",
    "read_truth",
    "read_truth_frames",
    "write_synthetic",
]

"""The one frame writer: whole chunks, header lists committed after their pixels, appends."""

from __future__ import annotations

import numpy as np
import pytest

from sdofm.archive.writer import FrameWriter
from sdofm.datasets.sdoml import SDOMLError, open_group


def _frame(value: float, size: int = 8) -> np.ndarray:
    return np.full((size, size), value, np.float32)


def test_frames_and_header_lists_append_across_writers(tmp_path):
    year = open_group(str(tmp_path / "AIA.zarr"), mode="w").require_group("2012")
    w = FrameWriter(year, "171A", 8, 4, reserve=10)
    for i in range(6):  # one whole chunk and a partial one
        w.add(_frame(i), {"t_obs": f"t{i}", **({"exptime": 2.0} if i % 2 == 0 else {})})
    w.close()  # trims the reserve
    a = year["171A"]
    assert a.shape == (6, 8, 8) and a.chunks == (4, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a[:, 0, 0], np.arange(6))
    assert a.attrs["T_OBS"] == [f"t{i}" for i in range(6)]  # keys upper-case
    assert a.attrs["EXPTIME"] == [2.0, None, 2.0, None, 2.0, None]  # None where a frame lacks it

    w = FrameWriter(year, "171A", 8, 4)  # a later run appends
    assert w.n_frames == 6
    w.add(_frame(6), {"T_OBS": "t6"})
    w.close()
    a = year["171A"]
    np.testing.assert_array_equal(a[:, 0, 0], np.arange(7))
    assert a.attrs["T_OBS"][-1] == "t6" and a.attrs["EXPTIME"] == [2.0, None] * 3 + [None]


def test_uncommitted_frames_and_other_sizes_are_refused(tmp_path):
    year = open_group(str(tmp_path / "AIA.zarr"), mode="w").require_group("2012")
    w = FrameWriter(year, "193A", 8, 4)
    for i in range(4):  # a whole chunk is written at once, its headers only at commit
        w.add(_frame(i), {"T_OBS": f"t{i}"})
    assert year["193A"].shape[0] == 4 and "T_OBS" not in year["193A"].attrs
    with pytest.raises(SDOMLError, match="4 frames but its T_OBS list has 0"):
        FrameWriter(year, "193A", 8, 4)
    w.commit()
    assert FrameWriter(year, "193A", 8, 4).n_frames == 4
    with pytest.raises(SDOMLError, match="cannot append 16x16"):
        FrameWriter(year, "193A", 16, 4)
    with pytest.raises(ValueError, match="expected \\(8, 8\\)"):
        FrameWriter(year, "193A", 8, 4).add(_frame(0, size=16), {"T_OBS": "t"})

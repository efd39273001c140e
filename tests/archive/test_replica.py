"""The archive-scale replica: the SDOML v2 layout, real-sized headers, few written chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

pytest.importorskip("sunpy", reason="the replica's keyword set comes from sunpy's test files")

from sdofm.archive.synthetic.replica import write_replica  # noqa: E402
from sdofm.datasets.sdoml import ImageStore  # noqa: E402


def test_replica_layout_headers_and_sparse_chunks(tmp_path):
    report = write_replica(
        str(tmp_path),
        years=[2013, 2014],
        aia_channels=["171A"],
        hmi_channels=["Bz"],
        size=32,
        days=1,
    )
    assert report.frames == {"2013/171A": 240, "2014/171A": 240, "2013/Bz": 120, "2014/Bz": 120}
    arr = tmp_path / "sdomlv2.zarr" / "2014" / "171A"
    text = (arr / ".zattrs").read_text()
    attrs = json.loads(text)
    assert report.header_bytes["2014/171A"] == len(text.encode())
    # The full level-1 AIA keyword set, one entry per frame, as zarr-python 2 indented it.
    assert len(attrs) >= 175 and {len(v) for v in attrs.values()} == {240}
    assert {"T_OBS", "EXPTIME", "DEG_COR", "QUALITY", "R_SUN", "CRPIX1", "FSN"} <= set(attrs)
    assert text.startswith('{\n    "ACS_CGT": [\n        "GT3",')
    # A real year (~221 MB over up to 87,600 frames) is ~2.5 KB of header per frame.
    assert 2_000 < len(text) / 240 < 4_000
    # 16 chunks of 15 frames; only the first and last two hold pixels.
    assert sorted(p.name for p in arr.iterdir() if not p.name.startswith(".")) == [
        "0.0.0",
        "1.0.0",
        "14.0.0",
        "15.0.0",
    ]
    z = zarr.open_array(arr, mode="r")
    assert z.shape == (240, 32, 32) and z.chunks == (15, 32, 32)
    store = ImageStore(str(tmp_path / "sdomlv2.zarr"), "aia")
    got = store.read_frames("2014", "171A", [0, 100, 239], check=False)
    np.testing.assert_array_equal(got, z.get_orthogonal_selection((np.array([0, 100, 239]),)))
    assert got[0].max() > 50 and (got[1] == 0).all()  # a written frame, an unwritten one
    t = store.frame_times("2014", "171A").times
    assert str(t[0]).startswith("2014-01-01T00:00") and not store.frame_times("2014", "171A").n_bad
    hmi = ImageStore(str(tmp_path / "sdomlv2_hmi.zarr"), "hmi")
    assert str(hmi.frame_times("2013", "Bz").times[1]).startswith("2013-01-01T00:12:00")

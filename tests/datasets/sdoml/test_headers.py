"""Per-frame header lists: kept as JSON reads them, parsed once per process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdofm.datasets.sdoml import ImageStore, clear_header_cache, parse_header
from sdofm.datasets.sdoml.headers import parse_frame_times


def _edit_attrs(array_dir: Path, edit) -> None:
    path = array_dir / ".zattrs"
    attrs = json.loads(path.read_text())
    edit(attrs)
    path.write_text(json.dumps(attrs))
    clear_header_cache()


def test_header_length_mismatch_and_nulls_are_listed(synth_copy):
    arr = synth_copy / "sdomlv2.zarr" / "2012" / "171A"

    def edit(attrs):
        attrs["T_OBS"] = attrs["T_OBS"][:-3]  # 3 frames without an entry
        attrs["T_OBS"][5] = None

    _edit_attrs(arr, edit)
    store = ImageStore(str(synth_copy / "sdomlv2.zarr"), "aia")
    ft = store.frame_times("2012", "171A")
    n = store.array("2012", "171A").shape[0]
    assert ft.problems["header_length_mismatch"] == [n - 3, n - 2, n - 1]
    assert ft.problems["header_null"] == [5]
    assert ft.n_bad == 4 and np.isnat(ft.times[[5, n - 1]]).all()


def test_frame_times_name_null_unparseable_and_missing_entries():
    ft = parse_frame_times(
        ["2012-06-29T00:00:00Z", None, "x", "2012.06.29_00:06:34_TAI"], 6
    )  # TAI - 34 s
    assert ft.problems == {
        "header_length_mismatch": [4, 5],
        "header_null": [1],
        "header_unparseable": [2],
    }
    assert ft.n_bad == 4 and ft.times[3] == np.datetime64("2012-06-29T00:06:00", "ns")
    longer = parse_frame_times(["2012-06-29T00:00:00Z"] * 3, 2)  # cut to the array's length
    assert len(longer.times) == 2 and longer.n_bad == 0


def test_parse_header_keeps_the_wanted_lists_as_json_reads_them():
    attrs = {
        "AAA": ["T_OBS"] * 3,  # a value that looks like a key
        "DEG_COR": [0.9, None, 0.8],
        "EXPTIME": [2.0, "2.0", 1.9],
        "T_OBS": ["2012-06-29T00:00:00.12Z", None, "x"],
        "ZZZ": [{"T_OBS": 1}],
    }
    flat = {k: v for k, v in attrs.items() if k != "ZZZ"}  # each key once: decoded alone
    docs = [json.dumps(d, indent=i, sort_keys=True) for d in (attrs, flat) for i in (None, 4)]
    for raw in docs:
        h = parse_header(raw.encode())
        assert h.t_obs == attrs["T_OBS"] and h.nbytes == len(raw)
        np.testing.assert_array_equal(h.numbers["DEG_COR"], [0.9, np.nan, 0.8])
        np.testing.assert_array_equal(h.numbers["EXPTIME"], [2.0, np.nan, 1.9])
        assert "QUALITY" not in h.numbers
    h = parse_header(json.dumps({"DEG_COR": [1.0]}).encode())
    assert h.t_obs is None and list(h.numbers) == ["DEG_COR"]


def test_headers_are_parsed_once_per_process(synth_root):
    store = ImageStore(str(synth_root / "sdomlv2.zarr"), "aia")
    assert store.frame_times("2012", "193A") is store.frame_times("2012", "193A")
    other = ImageStore(str(synth_root / "sdomlv2.zarr"), "aia")  # a new handle, same process
    assert other.frame_times("2012", "193A") is store.frame_times("2012", "193A")

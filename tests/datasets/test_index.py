import datetime as dt
import json
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from sdofm.archive.synthetic import read_truth_frames
from sdofm.datasets import index as index_mod
from sdofm.datasets.index import (
    build_index,
    forecast_windows,
    load_or_build_index,
    make_windows,
    read_index,
)
from sdofm.datasets.sdoml import LayoutError, clear_header_cache, open_group
from tests.conftest import small_config

NS = 10**9


def _cfg(root, tmp_path, *extra):
    return small_config(root, f"data.cache_dir={tmp_path / 'cache'}", *extra).data


def _expected_from_truth(truth: pd.DataFrame, channels, cadence_s: int, tol_s: float):
    """A brute-force alignment straight from the generator's frame table."""
    t = {c: truth[truth.channel == c] for c in channels}
    t_ns = {c: v.time.astype("int64").to_numpy() for c, v in t.items()}
    lo = min(v.min() for v in t_ns.values()) // (cadence_s * NS) * cadence_s * NS
    hi = max(v.max() for v in t_ns.values())
    grid = np.arange(lo, hi + 1, cadence_s * NS)
    rows = {}
    keep = np.ones(len(grid), bool)
    for c in channels:
        d = np.abs(t_ns[c][None, :] - grid[:, None])
        best = d.argmin(axis=1)
        keep &= d[np.arange(len(grid)), best] <= tol_s * NS
        rows[c] = (t[c].year.astype(int).to_numpy()[best], t[c]["index"].to_numpy()[best])
    return grid[keep], {c: (y[keep], i[keep]) for c, (y, i) in rows.items()}


def test_index_matches_generator_truth_exactly(synth_root, tmp_path):
    cfg = _cfg(synth_root, tmp_path, "data.split.buffer=0s")
    table, prov = build_index(cfg)
    truth = read_truth_frames(str(synth_root))
    grid, rows = _expected_from_truth(truth, cfg.channels, 720, 360)
    np.testing.assert_array_equal(table.time.astype("int64").to_numpy(), grid)
    for c in cfg.channels:
        np.testing.assert_array_equal(table[f"{c}_year"].to_numpy(), rows[c][0], err_msg=c)
        np.testing.assert_array_equal(table[f"{c}_idx"].to_numpy(), rows[c][1], err_msg=c)
    assert prov["n_rows"] == len(table) > 100
    assert prov["dropped"]["no data at all"] > 0 and prov["dropped"]["missing 171A"] > 0
    assert prov["channels"] == cfg.channels and prov["tolerance_s"] == 360


def test_tolerance_and_cadence_are_honoured(synth_root, tmp_path):
    cfg = _cfg(
        synth_root,
        tmp_path,
        "data.cadence=24min",
        "data.tolerance=20s",
        "data.hmi_channels=[]",
        "data.split.buffer=0s",
    )
    table, _ = build_index(cfg)
    assert (table.time.astype("int64") % (24 * 60 * NS) == 0).all()
    assert table[[f"{c}_dt" for c in cfg.aia_channels]].abs().max().max() <= 20
    truth = read_truth_frames(str(synth_root))
    grid, _ = _expected_from_truth(truth, cfg.aia_channels, 1440, 20)
    assert len(table) == len(grid)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_same_index_through_fsspec_urls(synth_root, tmp_path, scheme):
    local, _ = build_index(_cfg(synth_root, tmp_path))
    if scheme == "memory":
        mem = fsspec.filesystem("memory")
        mem.put(str(synth_root), "/served/synthetic", recursive=True)
        url = "memory://served/synthetic"
    else:
        url = f"file://{synth_root}"
    clear_header_cache()
    remote, prov = build_index(_cfg(url, tmp_path))
    pd.testing.assert_frame_equal(local, remote)
    assert prov["stores"]["aia"].startswith(url)


def test_month_split_and_buffer(synth_root, tmp_path):
    table, prov = build_index(_cfg(synth_root, tmp_path, "data.split.buffer=6h"))
    month = table.time.dt.month
    assert (table.split[month == 11] == "val").all() and (table.split[month == 12] == "test").all()
    assert (table.split[month <= 10] == "train").all()
    assert set(prov["splits"]) == {"train", "val", "test"} and min(prov["splits"].values()) > 0
    # No step lies within 6 h of a month boundary where the split changes.
    for boundary in ("2012-11-01", "2012-12-01"):
        b = pd.Timestamp(boundary, tz="UTC")
        assert ((table.time - b).abs() >= pd.Timedelta("6h")).all()


def test_month_split_names_one_year_month_or_the_month_of_every_year():
    from sdofm.config import ConfigError, load_config

    split = load_config(
        None, ['data.split.val_months=[4, "2012-06"]', 'data.split.test_months=["2011-06", 5]']
    ).data.split
    days = ["2011-04-02", "2013-04-30", "2011-06-03", "2012-06-01", "2013-06-01", "2012-05-09"]
    grid = np.array(days, dtype="datetime64[ns]").astype(np.int64)
    labels = index_mod.assign_splits(grid, split)
    assert labels.tolist() == ["val", "val", "test", "val", "train", "test"]
    for val, test in (("[6]", '["2011-06"]'), ('["2011-06"]', "[6]"), ('["2011-13"]', "[1]")):
        with pytest.raises(ConfigError, match="overlap|YYYY-MM"):
            load_config(None, [f"data.split.val_months={val}", f"data.split.test_months={test}"])


def test_block_split_keeps_blocks_whole_with_buffers(synth_root, tmp_path):
    cfg = _cfg(
        synth_root,
        tmp_path,
        "data.split.method=block",
        "data.split.block=12h",
        "data.split.val_fraction=0.2",
        "data.split.test_fraction=0.2",
        "data.split.buffer=2h",
    )
    table, prov = build_index(cfg)
    assert (
        prov["splits"]["val"] > 0
        and prov["splits"]["test"] > 0
        and prov["dropped"]["split buffer"] > 0
    )
    t = table.time.astype("int64").to_numpy()
    s = table.split.astype(str).to_numpy()
    for i in np.flatnonzero(s[1:] != s[:-1]):
        assert t[i + 1] - t[i] >= 4 * 3600 * NS  # 2 h dropped on each side of a split change
    again, _ = build_index(cfg)
    assert (again.split == table.split).all()  # reproducible from the seed


def test_windows_are_contiguous_in_time_and_split(synth_root, tmp_path):
    table, _ = build_index(_cfg(synth_root, tmp_path))
    w = make_windows(table, 3, dt.timedelta(hours=1))
    assert w.shape[1] == 3 and len(w) > 10
    t = table.time.astype("int64").to_numpy()
    assert (np.diff(t[w], axis=1) == 3600 * NS).all()
    s = table.split.astype(str).to_numpy()[w]
    assert (s == s[:, :1]).all()
    # Every window that exists is found: brute force over all rows.
    have = set(t)
    expected = sum(
        all(x - k * 3600 * NS in have for k in (1, 2))
        and len({table.split.iloc[np.searchsorted(t, x - k * 3600 * NS)] for k in (0, 1, 2)}) == 1
        for x in t
    )
    assert len(w) == expected
    val = make_windows(table, 2, dt.timedelta(minutes=12), split="val")
    assert (table.split.to_numpy()[val] == "val").all()


def test_eve_alignment_drops_missing_spectra(synth_copy, tmp_path):
    cfg = _cfg(synth_copy, tmp_path, "data.eve_lines=default")
    before, prov = build_index(cfg)
    eve = open_group(str(synth_copy / "sdomlv2_eve.zarr"), mode="r+")["MEGS-A"]
    assert (eve["He II"][before.eve_row.to_numpy()] >= 0).all()
    # EVE all -1 over a two-hour window inside the data.
    t0 = before.time.iloc[len(before) // 3]
    times = pd.to_datetime(eve["Time"][:]).tz_localize("UTC")
    window = (times >= t0) & (times < t0 + pd.Timedelta("2h"))
    for line in cfg.eve_lines:
        values = eve[line][:]
        values[np.asarray(window)] = -1
        eve[line][:] = values
    clear_header_cache()
    after, prov2 = build_index(cfg)
    assert not (
        (after.time >= t0) & (after.time < t0 + pd.Timedelta("2h") - pd.Timedelta("6min"))
    ).any()
    assert len(after) < len(before)
    assert prov2["dropped"]["EVE spectrum missing (-1)"] > prov["dropped"].get(
        "EVE spectrum missing (-1)", 0
    )


def _edit_tobs(synth_copy, channel, edit):
    path = synth_copy / "sdomlv2.zarr" / "2012" / channel / ".zattrs"
    attrs = json.loads(path.read_text())
    edit(attrs["T_OBS"])
    path.write_text(json.dumps(attrs))
    clear_header_cache()


def test_mixed_time_formats_in_one_year_give_the_same_index(synth_copy, tmp_path):
    cfg = _cfg(synth_copy, tmp_path)
    before, _ = build_index(cfg)

    def mix(tobs):  # as in AIA 2020: some entries without 'T' / 'Z'
        for i in range(0, len(tobs), 2):
            tobs[i] = tobs[i].replace("T", " ").rstrip("Z")

    _edit_tobs(synth_copy, "171A", mix)
    after, _ = build_index(cfg)
    pd.testing.assert_frame_equal(before, after)


def test_bad_headers_are_skipped_and_counted_or_raise(synth_copy, tmp_path):
    def damage(tobs):
        tobs[3] = "not a time"
        tobs[7] = None

    _edit_tobs(synth_copy, "193A", damage)
    _, prov = build_index(_cfg(synth_copy, tmp_path))
    assert prov["bad_headers"]["193A"] == {"header_unparseable": 1, "header_null": 1}
    assert any("2012/193A frame 3: header_unparseable" in e for e in prov["examples"])
    with pytest.raises(
        LayoutError,
        match=r"sdomlv2.zarr 2012/193A frame 7: header_null|frame 3: header_unparseable \(T_OBS = 'not a time'\)",
    ):
        build_index(_cfg(synth_copy, tmp_path, "data.on_bad_header=raise"))


def test_missing_year_in_requested_span(synth_root, tmp_path):
    cfg = _cfg(synth_root, tmp_path, "data.start=2012-06-29", "data.end=2013-01-02")
    with pytest.raises(LayoutError, match=r"missing year\(s\) 2013"):
        build_index(cfg)


def test_reused_until_the_store_changes(synth_copy, tmp_path):
    cfg = _cfg(synth_copy, tmp_path)
    table, first = load_or_build_index(cfg)
    assert not first.reused
    again, second = load_or_build_index(cfg)
    assert second.reused and second.path == first.path
    pd.testing.assert_frame_equal(table, again)
    _edit_tobs(synth_copy, "94A", lambda tobs: tobs.__setitem__(0, None))
    _, third = load_or_build_index(cfg)
    assert not third.reused and third.bad_headers["94A"] == {"header_null": 1}
    _, prov = read_index(third.path)
    assert prov["bad_headers"]["94A"] == {"header_null": 1}


def test_index_write_is_atomic(synth_root, tmp_path, monkeypatch):
    cfg = _cfg(synth_root, tmp_path)
    _, report = load_or_build_index(cfg)
    good = open(report.path, "rb").read()

    def broken(table, where, *a, **k):
        where.write(b"half a file")  # the stream the index file's bytes go through
        raise OSError("disk full")

    import pyarrow.parquet as pq

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        load_or_build_index(cfg, rebuild=True)
    assert open(report.path, "rb").read() == good
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [report.path.split("/")[-1]]
    assert Path(index_mod.index_path(cfg)).exists()


def test_index_cached_in_object_storage(synth_root, s3_server, monkeypatch):
    """``data.cache_dir`` as an s3:// URL (credentials from the environment): the index is
    written there once and reused from there by a process that has no local copy."""
    from tests.s3 import KEY, REGION, SECRET

    for k, v in {
        "AWS_ENDPOINT_URL": s3_server.url,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(k, v)
    s3_server.create_bucket("sdofm-index-cache")
    cfg = small_config(synth_root, "data.cache_dir=s3://sdofm-index-cache/cache").data
    table, first = load_or_build_index(cfg)
    assert not first.reused and first.path.startswith("s3://sdofm-index-cache/cache/index-")
    keys = [
        o["Key"] for o in s3_server.client().list_objects_v2(Bucket="sdofm-index-cache")["Contents"]
    ]
    assert keys == [first.path.removeprefix("s3://sdofm-index-cache/")], keys
    again, second = load_or_build_index(cfg)
    assert second.reused and second.path == first.path
    pd.testing.assert_frame_equal(table, again)


def test_forecast_windows_against_a_hand_count():
    """An hourly grid 00:00-09:00 with 04:00 missing, train until 06:00 and val after; two
    inputs one hour apart and two leads. By hand, t (the last input) -> window:
    train rows 00,01,02,03,05,06: t=01 (00,01 | 02,03) is the only one complete in train
    (t=00 lacks 23:00; t=02 and t=03 need 04:00; t=05 needs 04:00; t=06 needs 07:00 in
    val); val rows 07,08,09: none (t=07 needs 06:00 in train, t=08 and 09 run past 09:00)."""
    hours = [0, 1, 2, 3, 5, 6, 7, 8, 9]
    table = pd.DataFrame(
        {
            "time": pd.to_datetime([f"2012-03-01T{h:02d}:00" for h in hours], utc=True),
            "split": pd.Categorical(["train"] * 6 + ["val"] * 3),
        }
    )
    w, dropped = forecast_windows(table, 2, 2, dt.timedelta(hours=1), split="train")
    assert [[hours[i] for i in row] for row in w] == [[0, 1, 2, 3]] and dropped == 5
    w, dropped = forecast_windows(table, 2, 2, dt.timedelta(hours=1), split="val")
    assert len(w) == 0 and dropped == 3
    # One input, one lead, every split: t = 00, 01, 02, 05, 07, 08 have their next hour in
    # the same split; 03 (04:00 missing), 06 (07:00 is val) and 09 (the end) do not.
    w, dropped = forecast_windows(table, 1, 1, dt.timedelta(hours=1))
    got = [[hours[i] for i in row] for row in w]
    assert got == [[0, 1], [1, 2], [2, 3], [5, 6], [7, 8], [8, 9]] and dropped == 3

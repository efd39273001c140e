"""Ingest of level-1 FITS files with Ray Data, tested on the real SDO frames that the sunpy
wheel ships."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

fits = pytest.importorskip(
    "astropy.io.fits", reason="needs the ingest extra: pip install -e '.[ingest]'"
)
sunpy_test = pytest.importorskip(
    "sunpy.data.test", reason="needs the ingest extra (sunpy test files)"
)

from sdofm.archive.fits import process_file  # noqa: E402
from sdofm.archive.ingest import ingest  # noqa: E402
from sdofm.cli import app  # noqa: E402
from sdofm.datasets.sdoml import ImageStore, LayoutError, describe_image_store, open_group  # noqa: E402
from tests.archive.test_fits import AIA, HMI, SIZE, _variant  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fits")
    shutil.copy(AIA, d / "aia_171_level1.fits")
    shutil.copy(HMI, d / "resampled_hmi.fits")
    (d / "README.txt").write_text("not a FITS name: ignored")
    return d


@pytest.fixture(scope="module")
def stores(good_dir, tmp_path_factory, ray_session):
    """AIA and HMI stores ingested once (64 px, 8 frames a chunk like the synthetic fixture)."""
    root = tmp_path_factory.mktemp("ingested")
    aia = ingest(str(good_dir), str(root), "aia", size=SIZE, frames_per_chunk=8)
    hmi = ingest(str(good_dir), str(root), "hmi", size=SIZE, frames_per_chunk=8, channel="Bz")
    return root, aia, hmi


# --------------------------------------------------------------------------- the job


def test_ingest_writes_real_frames_and_headers(stores):
    root, aia, hmi = stores
    assert aia.ingested == {"171A": 1} and hmi.ingested == {"Bz": 1}
    assert [Path(p).name for p, _ in aia.skipped] == ["resampled_hmi.fits"]
    assert "not an SDO/AIA file" in aia.skipped[0][1] and aia.files == 2
    store = ImageStore(str(root / "sdomlv2.zarr"), "aia")
    assert store.years == ["2011"] and store.channels("2011") == ["171A"]
    assert store.validate(["171A"]) == (SIZE, SIZE)
    np.testing.assert_array_equal(
        store.read_frames("2011", "171A", [0])[0], process_file(AIA, "aia", SIZE)[1]
    )
    assert str(store.frame_times("2011", "171A").times[0]) == "2011-02-15T00:00:01.340000000"
    attrs = json.loads((root / "sdomlv2.zarr" / "2011" / "171A" / ".zattrs").read_text())
    assert all(isinstance(v, list) and len(v) == 1 for v in attrs.values())
    assert attrs["DEG_COR"] == [1.0] and attrs["PIXLUNIT"] == ["DN/s"] and len(attrs) > 180
    hstore = ImageStore(str(root / "sdomlv2_hmi.zarr"), "hmi")
    assert str(hstore.frame_times("2014", "Bz").times[0]) == "2014-03-01T00:00:50.000000000"


def test_rerun_adds_nothing(stores, good_dir, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(stores[0], root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    report = ingest(str(good_dir), str(root), "aia")  # size and chunking from the store
    assert report.ingested == {} and [Path(p).name for p in report.already] == [
        "aia_171_level1.fits"
    ]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_bad_files_are_skipped_and_reported(ray_session, tmp_path):
    d = tmp_path / "fits"
    d.mkdir()
    shutil.copy(AIA, d / "good.fits")
    shutil.copy(AIA, d / "same_frame.fits")
    (d / "corrupt.fits").write_bytes(b"not a FITS file at all" * 10)
    whole = _variant(tmp_path / "whole.fits", T_OBS="2011-02-15T00:24:01.34Z").read_bytes()
    (d / "truncated.fits").write_bytes(whole[:70_000])  # the header intact, the data cut
    fits.PrimaryHDU(np.ones((16, 16), np.float32)).writeto(d / "plain.fits")
    _variant(d / "no_exptime.fits", drop=("EXPTIME",), T_OBS="2011-02-15T00:06:01.34Z")
    _variant(d / "quality.fits", QUALITY=1024, T_OBS="2011-02-15T00:12:01.34Z")
    _variant(d / "lev15.fits", LVL_NUM=1.5, T_OBS="2011-02-15T00:18:01.34Z")
    _variant(d / "bad_time.fits", T_OBS="sometime in 2011")
    report = ingest(str(d), str(tmp_path / "out"), "aia", size=32)
    assert report.ingested == {"171A": 1} and report.files == 9
    why = {Path(p).name: reason for p, reason in report.skipped}
    assert set(why) == set(p.name for p in d.iterdir()) - {"good.fits"}
    assert "not a FITS file" in why["corrupt.fits"] or "unreadable" in why["corrupt.fits"]
    assert "corrupt" in why["truncated.fits"]
    assert "not an SDO/AIA file" in why["plain.fits"]
    assert why["no_exptime.fits"] == "missing keyword(s) EXPTIME"
    assert why["quality.fits"].startswith("QUALITY=1024")
    assert why["lev15.fits"] == "not level 1 (LVL_NUM=1.5)"
    assert "unparseable T_OBS" in why["bad_time.fits"]
    assert (
        why["same_frame.fits"].startswith("same channel and T_OBS as")
        and "good.fits" in why["same_frame.fits"]
    )
    assert (
        ImageStore(str(tmp_path / "out" / "sdomlv2.zarr"), "aia").array("2011", "171A").shape[0]
        == 1
    )


class _Crash(Exception):
    pass


def _crash_after(frames: int, n_files: int):
    """A progress callback that kills the run once ``frames`` frames have been received."""

    def progress(done: int, total: int) -> None:
        if total > n_files and done - n_files >= frames:  # past the header pass
            raise _Crash

    return progress


def test_a_crash_leaves_a_store_that_opens_and_a_rerun_completes(ray_session, tmp_path):
    d = tmp_path / "fits"
    d.mkdir()
    shutil.copy(AIA, d / "aia_171_level1.fits")
    for k, t in enumerate(("2011-02-15T00:06:01.34Z", "2011-02-15T00:12:01.34Z")):
        _variant(d / f"later_{k}.fits", T_OBS=t, **{"DATE-OBS": t[:-1]})
    root, url = tmp_path / "root", str(tmp_path / "root" / "sdomlv2.zarr")
    run = dict(size=32, frames_per_chunk=1, batch_size=1)  # every frame is a chunk of its own

    def summary() -> dict:
        return describe_image_store(ImageStore(url, "aia"))["years"]["2011"]["171A"]

    # Killed after the first frame's pixels were written, before any header was committed.
    with pytest.raises(_Crash):
        ingest(str(d), str(root), "aia", **run, progress=_crash_after(1, 3))
    assert (summary()["frames"], summary()["bad_headers"]) == (3, 3)
    # Killed again after one frame was committed.
    with pytest.raises(_Crash):
        ingest(str(d), str(root), "aia", **run, commit_every=1, progress=_crash_after(1, 3))
    assert (summary()["frames"], summary()["bad_headers"]) == (3, 2)
    report = ingest(str(d), str(root), "aia", **run)
    assert report.dropped_uncommitted == 2 and report.ingested == {"171A": 2}
    assert [Path(p).name for p in report.already] == ["aia_171_level1.fits"]
    times = ImageStore(url, "aia").frame_times("2011", "171A")
    assert summary()["frames"] == 3 and not times.problems
    assert list(np.diff(times.times).astype(np.int64)) == [360 * 10**9] * 2
    assert ingest(str(d), str(root), "aia").ingested == {}


def test_target_of_another_layout_is_a_clear_error(stores, good_dir, synth_copy, tmp_path):
    root = stores[0]
    with pytest.raises(LayoutError, match="synthetic Sun"):
        ingest(str(good_dir), str(synth_copy), "aia")
    with pytest.raises(LayoutError, match="is an HMI store, not an AIA store"):
        ingest(str(good_dir), str(root / "sdomlv2_hmi.zarr"), "aia")
    with pytest.raises(LayoutError, match="holds 64 px frames: cannot add 32 px"):
        ingest(str(good_dir), str(root), "aia", size=32)
    (tmp_path / "notzarr.zarr").mkdir()
    (tmp_path / "notzarr.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(LayoutError, match="is not a zarr group"):
        ingest(str(good_dir), str(tmp_path / "notzarr.zarr"), "aia")
    other = open_group(str(tmp_path / "other.zarr"), mode="w")
    other.create_array("images", shape=(2, 8, 8), dtype="float32")
    other.create_group("2011").create_array("171A", shape=(2, 8), dtype="float32")
    with pytest.raises(LayoutError) as e:
        ingest(str(good_dir), str(tmp_path / "other.zarr"), "aia")
    assert "array 'images' at the top level" in str(
        e.value
    ) and "2011/171A has shape (2, 8)" in str(e.value)
    r = runner.invoke(
        app, ["data", "ingest", str(good_dir), str(synth_copy), "--instrument", "aia"]
    )
    assert r.exit_code == 2 and "synthetic Sun" in r.output and "Traceback" not in r.output


def test_ingested_and_synthetic_stores_look_alike_to_the_reader(stores, synth_root):
    root = stores[0]
    for store, channel, shared in (
        ("sdomlv2.zarr", "171A", None),
        ("sdomlv2_hmi.zarr", "Bz", {"T_OBS", "PIXLUNIT"}),
    ):
        ours = root / store / ("2011" if channel == "171A" else "2014") / channel
        synth = synth_root / store / "2012" / channel
        meta = [json.loads((p / ".zarray").read_text()) for p in (ours, synth)]
        for m in meta:
            m.pop("shape")
            m["chunks"] = m["chunks"][:1]  # frames per chunk; the frame sizes differ (64, 32)
        assert meta[0] == meta[1]
        attrs = [json.loads((p / ".zattrs").read_text()) for p in (ours, synth)]
        assert all(isinstance(v, list) for a in attrs for v in a.values())
        # Every key the synthetic Sun writes is in the real AIA header (HMI: the ones the reader needs).
        assert (shared or set(attrs[1])) <= set(attrs[0])
        for base in (root, synth_root):
            group = open_group(str(base / store))
            year = next(iter(k for k, _ in group.groups()))
            assert json.loads((base / store / ".zgroup").read_text()) == {"zarr_format": 2}
            s = ImageStore(str(base / store), "aia" if channel == "171A" else "hmi")
            s.validate([channel], [year])
            assert ImageStore._raw_codec(s.array(year, channel)) is not None  # the fast read path
            assert not s.frame_times(year, channel).problems


def test_cli_ingest_info_index(good_dir, ray_session, tmp_path):
    root = tmp_path / "real"
    r = runner.invoke(
        app,
        [
            "data",
            "ingest",
            str(good_dir),
            str(root),
            "--instrument",
            "aia",
            "--size",
            "32",
            "--deg-cor",
            "171A=0.8",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "ingested 1 frames (171A: 1)" in r.output and "resampled_hmi.fits" in r.output
    assert "not an SDO/AIA file" in r.output
    r = runner.invoke(
        app, ["data", "ingest", str(good_dir), str(root), "--instrument", "hmi", "--channel", "Bz"]
    )
    assert r.exit_code == 0 and "ingested 1 frames (Bz: 1)" in r.output, r.output
    assert ImageStore(str(root / "sdomlv2.zarr"), "aia").header("2011", "171A", "DEG_COR")[0] == 0.8
    args = [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"]
    r = runner.invoke(app, ["data", "info", *args, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    row = info["aia"]["years"]["2011"]["171A"]
    assert row["frames"] == 1 and row["shape"] == [32, 32] and row["chunks"] == [15, 32, 32]
    assert row["first"] == "2011-02-15T00:00:01" and row["bad_headers"] == 0
    assert info["hmi"]["years"]["2014"]["Bz"]["first"] == "2014-03-01T00:00:50"
    r = runner.invoke(app, ["data", "info", *args])
    assert r.exit_code == 0 and "blosc zstd 5 bit-shuffle" in r.output and "171A" in r.output
    # The two real frames are three years apart: index each instrument on its own.
    r = runner.invoke(
        app, ["data", "index", *args, "data.aia_channels=[171A]", "data.hmi_channels=[]"]
    )
    assert r.exit_code == 0, r.output
    assert "built index" in r.output and "1 aligned steps" in r.output
    r = runner.invoke(
        app, ["data", "index", *args, "data.aia_channels=[]", "data.hmi_channels=[Bz]"]
    )
    assert r.exit_code == 0 and "1 aligned steps" in r.output, r.output

"""Ingest of level-1 FITS files, tested on the real SDO frames that the sunpy wheel ships."""

from __future__ import annotations

import json
import shutil
import warnings
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

from sdofm.cli import app  # noqa: E402
from sdofm.datasets.ingest import (  # noqa: E402
    SkipFrame,
    disk_radius_px,
    ingest,
    process_file,
    read_fits,
    solar_resample,
)
from sdofm.datasets.sdoml import ImageStore, LayoutError, describe_image_store, open_group  # noqa: E402

AIA = sunpy_test.get_test_filepath("aia_171_level1.fits")  # 128 px, T_OBS 2011-02-15T00:00:01.34Z
HMI = sunpy_test.get_test_filepath("resampled_hmi.fits")  # 100 px continuum, T_OBS in TAI
SIZE = 64
runner = CliRunner()


def _variant(dst: Path, src: str = AIA, drop: tuple[str, ...] = (), **cards) -> Path:
    """A copy of a real file (AIA by default) with header cards changed or dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # BLANK on float data
        with fits.open(src) as hdul:
            header, data = hdul[0].header.copy(), hdul[0].data.copy()
    header.remove("BLANK")  # only meaningful for integer data; astropy warns on floats
    for key in drop:
        del header[key]
    header.update(cards)
    fits.PrimaryHDU(data, header).writeto(dst)
    return dst


def _radial(img: np.ndarray, cx: float, cy: float, radius: float, lo: float, hi: float) -> float:
    """Mean of ``img (H, W)`` between ``lo`` and ``hi`` disk radii of centre (cx, cy), 0-based."""
    y, x = np.indices(img.shape)
    r = np.hypot(x - cx, y - cy) / radius
    return float(img[(r >= lo) & (r < hi)].mean())


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


# --------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("wcs", ["crota2", "pc"])
def test_resample_centres_turns_and_scales_the_disk(wcs):
    # A disk off the image centre, recorded upside down (CROTA2 = 180, as HMI), with a
    # marker to the north and one to the west. The reference pixel is not the disk
    # centre: CRVAL (84", -60") puts the centre at 1-based pixel (98, 105).
    header = {"CDELT1": 12.0, "CDELT2": 12.0, "CRPIX1": 91.0, "CRPIX2": 110.0, "RSUN_OBS": 950.0}
    header.update({"CRVAL1": 84.0, "CRVAL2": -60.0, "CUNIT1": "arcsec", "CUNIT2": "arcsec"})
    header.update(
        {"CROTA2": 180.0}
        if wcs == "crota2"
        else {"PC1_1": -1.0, "PC1_2": 0.0, "PC2_1": 0.0, "PC2_2": -1.0}
    )
    y, x = np.indices((200, 200))
    data = np.where(np.hypot(x - 97, y - 104) <= 950 / 12, 100.0, 0.0).astype(np.float32)
    data[52:57, 95:100] = 1000.0  # 600" north: rows decrease to the north here
    data[102:107, 45:50] = 500.0  # 600" west
    out = solar_resample(data, header, SIZE)
    radius = disk_radius_px(SIZE)
    disk = out > 50
    assert abs(disk.sum() / (np.pi * radius**2) - 1) < 0.03
    yy, xx = np.nonzero(disk)
    c = (SIZE - 1) / 2
    assert abs(yy.mean() - c) < 0.3 and abs(xx.mean() - c) < 0.3
    offset = 600 * (976 / 950) / (976 / radius)  # 600" at the fixed 976" radius, in pixels
    north = np.unravel_index(np.argmax(out), out.shape)
    assert abs(north[0] - (c + offset)) <= 1 and abs(north[1] - c) <= 1  # FITS order: row 0 south
    north_half = np.arange(SIZE)[:, None] > c + offset / 2
    west = np.unravel_index(np.argmax(np.where(north_half, 0, out)), out.shape)
    assert abs(west[0] - c) <= 1 and abs(west[1] - (c + offset)) <= 1 and out[west] > 300


def test_real_aia_frame_follows_the_recipe():
    info, frame, attrs = process_file(AIA, "aia", SIZE)
    header, data = read_fits(AIA)
    assert (info.channel, info.t_obs, info.year) == ("171A", "2011-02-15T00:00:01.34Z", "2011")
    assert frame.shape == (SIZE, SIZE) and frame.dtype == np.float32
    assert np.isfinite(frame).all() and frame.min() >= 0
    # DN/s at the fixed radius: the input's radial profile, about its WCS disk centre and
    # divided by EXPTIME, is the output's about the image centre at disk_radius_px.
    cx = header["CRPIX1"] - 1 - header["CRVAL1"] / header["CDELT1"]
    cy = header["CRPIX2"] - 1 - header["CRVAL2"] / header["CDELT2"]
    r_in = header["RSUN_OBS"] / header["CDELT1"]
    c, radius = (SIZE - 1) / 2, disk_radius_px(SIZE)
    for lo, hi, tol in ((0.0, 0.9, 0.03), (0.9, 1.0, 0.06), (1.02, 1.1, 0.1), (1.1, 1.25, 0.1)):
        want = _radial(data, cx, cy, r_in, lo, hi) / header["EXPTIME"]
        assert abs(_radial(frame, c, c, radius, lo, hi) / want - 1) < tol, (lo, hi)
    # 171 A is brightest just inside the limb: the profile peaks at the fixed radius.
    bins = np.arange(0.9, 1.1, 0.02)
    peak = bins[np.argmax([_radial(frame, c, c, radius, b, b + 0.02) for b in bins])]
    assert 0.96 <= peak <= 1.0
    # Every keyword kept, upper-case, plus DEG_COR and PIXLUNIT.
    assert set(header) - {"PIXLUNIT"} <= set(attrs) and all(k == k.upper() for k in attrs)
    assert attrs["DEG_COR"] == 1.0 and attrs["PIXLUNIT"] == "DN/s"
    assert attrs["EXPTIME"] == 2.000191 and attrs["QUALITY"] == 0 and attrs["WAVELNTH"] == 171
    assert "Astronomy" in attrs["COMMENT"] and attrs["OSCNMEAN"] == "nan"
    _, halved, attrs_half = process_file(AIA, "aia", SIZE, deg_cor={"171A": 0.5})
    assert attrs_half["DEG_COR"] == 0.5
    np.testing.assert_allclose(halved, 2 * frame, rtol=1e-6)


def test_real_hmi_frame_valid_pixels_and_zero_off_the_disk(tmp_path):
    info, frame, attrs = process_file(HMI, "hmi", SIZE, channel="Bz")
    # T_OBS 2014.03.01_00:01:25_TAI is 35 s ahead of UTC.
    assert np.datetime64(info.time_ns, "ns") == np.datetime64("2014-03-01T00:00:50")
    c, radius = (SIZE - 1) / 2, disk_radius_px(SIZE)
    y, x = np.indices(frame.shape)
    r = np.hypot(x - c, y - c)
    assert (frame[r > radius] == 0).all()
    assert (frame[r <= radius - 1] > 0).all()  # the NaNs of the file lie off the disk only
    # Continuum limb darkening survives the rescale.
    assert _radial(frame, c, c, radius, 0, 0.3) > 1.2 * _radial(frame, c, c, radius, 0.85, 0.95)
    assert attrs["PIXLUNIT"] == "DN/s" and attrs["CONTENT"] == "CONTINUUM INTENSITY"
    assert "DEG_COR" not in attrs and attrs["T_OBS"] == "2014.03.01_00:01:25_TAI"
    with pytest.raises(SkipFrame, match="not a magnetogram"):
        process_file(HMI, "hmi", SIZE)  # without a component named it is not taken
    # A line-of-sight magnetogram goes to Bz on its own, in Gauss.
    magnetogram = _variant(tmp_path / "m.fits", HMI, CONTENT="MAGNETOGRAM", BUNIT="Gauss")
    info, _, attrs = process_file(str(magnetogram), "hmi", SIZE)
    assert info.channel == "Bz" and attrs["PIXLUNIT"] == "Gauss"


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
    attrs = store.array("2011", "171A").attrs
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

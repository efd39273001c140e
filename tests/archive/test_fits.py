"""The SDOML v2 recipe for one level-1 FITS file, tested on the real SDO frames that the
sunpy wheel ships."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

fits = pytest.importorskip(
    "astropy.io.fits", reason="needs the ingest extra: pip install -e '.[ingest]'"
)
sunpy_test = pytest.importorskip(
    "sunpy.data.test", reason="needs the ingest extra (sunpy test files)"
)

from sdofm.archive.fits import SkipFrame, process_file, read_fits, solar_resample  # noqa: E402
from sdofm.constants import disk_radius_px  # noqa: E402

AIA = sunpy_test.get_test_filepath("aia_171_level1.fits")  # 128 px, T_OBS 2011-02-15T00:00:01.34Z
HMI = sunpy_test.get_test_filepath("resampled_hmi.fits")  # 100 px continuum, T_OBS in TAI
SIZE = 64


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

import datetime as dt
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from sdofm.archive.synthetic import (
    ActiveRegion,
    SyntheticSun,
    ensure_data,
    read_truth,
    read_truth_frames,
    write_synthetic,
)
from sdofm.config import load_config
from sdofm.constants import AIA_CHANNELS, HMI_CHANNELS
from sdofm.datasets.sdoml import Archive, ImageStore, SDOMLError, open_group
from tests.conftest import small_config


def _write(cfg):
    return write_synthetic(cfg.synth, cfg.data.root, cfg.data.storage_options)


def test_layout_matches_sdoml_v2(synth_root):
    for store, channels in (("sdomlv2.zarr", AIA_CHANNELS), ("sdomlv2_hmi.zarr", HMI_CHANNELS)):
        for c in channels:
            meta = json.loads((synth_root / store / "2012" / c / ".zarray").read_text())
            assert meta["zarr_format"] == 2 and meta["dtype"] == "<f4"
            assert meta["chunks"] == [8, 32, 32] and meta["shape"][1:] == [32, 32]
            assert meta["compressor"] == {
                "id": "blosc",
                "cname": "zstd",
                "clevel": 5,
                "shuffle": 2,
                "blocksize": 0,
            }
            attrs = json.loads((synth_root / store / "2012" / c / ".zattrs").read_text())
            assert all(len(v) == meta["shape"][0] for v in attrs.values())
    aia = json.loads((synth_root / "sdomlv2.zarr/2012/171A/.zattrs").read_text())
    assert {
        "T_OBS",
        "EXPTIME",
        "WAVELNTH",
        "QUALITY",
        "DEG_COR",
        "PIXLUNIT",
        "R_SUN",
        "CDELT1",
    } <= set(aia)
    assert (
        aia["T_OBS"][0].endswith("Z")
        and set(aia["PIXLUNIT"]) == {"DN/s"}
        and set(aia["WAVELNTH"]) == {171}
    )
    hmi = json.loads((synth_root / "sdomlv2_hmi.zarr/2012/Bz/.zattrs").read_text())
    assert "EXPTIME" not in hmi and hmi["T_OBS"][0].endswith("_TAI")
    eve = open_group(str(synth_root / "sdomlv2_eve.zarr"))["MEGS-A"]
    assert str(eve["Time"].dtype) == "<U23" and len(str(eve["Time"][0])) == 23
    assert eve["Fe XVIII"].attrs["wavelength"] == "9.3926 nm" and "logT" in eve["Fe XVIII"].attrs


def test_frame_order_counts_and_missing_values(synth_root):
    frames = read_truth_frames(str(synth_root))
    counts = frames[frames.instrument == "aia"].groupby("channel").size()
    assert counts.nunique() > 1  # each channel has its own gaps
    one = frames[(frames.channel == "171A")].sort_values("index")
    days = one.time.dt.date.to_numpy()
    assert not np.all(days[1:] >= days[:-1])  # days out of order ...
    for _, day in one.groupby(one.time.dt.date):  # ... frames within a day in time order
        assert day.time.is_monotonic_increasing
    eve = open_group(str(synth_root / "sdomlv2_eve.zarr"))["MEGS-A"]
    assert (eve["Fe XVI_2"][:] < 0).mean() > 0.8
    assert 0 < (eve["He II"][:] < 0).mean() < 0.2


def test_deterministic_from_seed():
    roots = ["memory://synth-a", "memory://synth-b", "memory://synth-c"]
    extra = ["synth.resolution=16", "synth.periods=[{start: 2012-03-01, days: 1}]"]
    _write(small_config(roots[0], *extra))
    _write(small_config(roots[1], *extra))
    _write(small_config(roots[2], *extra, "synth.seed=1"))
    a, b, c = (open_group(r + "/sdomlv2.zarr")["2012/193A"] for r in roots)
    np.testing.assert_array_equal(a[:], b[:])
    assert a.attrs["T_OBS"] == b.attrs["T_OBS"]
    assert a.shape != c.shape or not np.array_equal(a[:], c[:])
    ta, tb = read_truth(roots[0]), read_truth(roots[1])
    assert ta["active_regions"] == tb["active_regions"] and ta["flares"] == tb["flares"]


def test_reuse_and_refusal_to_overwrite(tmp_path):
    extra = ["synth.resolution=16", "synth.periods=[{start: 2012-03-01, days: 1}]"]
    cfg = small_config(tmp_path, *extra)
    assert not _write(cfg).reused
    assert _write(cfg).reused
    # A store written before a setting existed holds that setting's default (the Sun of
    # then): reused; a non-default value of it is not that store.
    truth = tmp_path / "synthetic_truth.json"
    old = json.loads(truth.read_text())
    del old["synth"]["network_variability"]
    truth.write_text(json.dumps(old))
    assert _write(cfg).reused
    with pytest.raises(SDOMLError, match="already exists"):
        _write(small_config(tmp_path, *extra, "synth.network_variability=0.3"))
    with pytest.raises(SDOMLError, match="already exists.*synth.overwrite=true"):
        _write(small_config(tmp_path, *extra, "synth.seed=5"))
    assert not _write(small_config(tmp_path, *extra, "synth.seed=5", "synth.overwrite=true")).reused
    assert read_truth(str(tmp_path))["synth"]["seed"] == 5


def test_degradation_recorded_per_frame(synth_root):
    truth = read_truth(str(synth_root))
    store = ImageStore(str(synth_root / "sdomlv2.zarr"), "aia")
    times = store.frame_times("2012", "304A").times
    deg = store.header("2012", "304A", "DEG_COR")
    years = (times - np.datetime64("2010-05-01")) / np.timedelta64(1, "D") / 365.25
    np.testing.assert_allclose(
        deg, np.exp(-years / truth["degradation"]["tau_years"]["304A"]), rtol=1e-6
    )
    assert (
        deg.min() < 1
        and truth["degradation"]["tau_years"]["304A"] < truth["degradation"]["tau_years"]["1700A"]
    )


# --------------------------------------------------------------------------- physics


@pytest.fixture(scope="module")
def sun():
    return SyntheticSun(small_config("unused", "synth.resolution=128").synth)


def _one_region(sun, lat: float) -> ActiveRegion:
    return ActiveRegion(
        id=0,
        lat=lat,
        lon=0.0,
        t_emerge=-5 * 86400,
        rise=3600,
        decay=30 * 86400,
        flux=1500,
        size=2.0,
        separation=8.0,
        tilt=0.5 * abs(lat),
        leading_sign=-1.0 if lat > 0 else 1.0,
        temperature=1.0,
    )


def _pixel(sun, lat: float, lon: float) -> tuple[float, float]:
    """(row, col) of a point on the disk: FITS order, row 0 south, column 0 east."""
    x, y, _ = sun._vector(lat, lon)
    c = (sun.res - 1) / 2
    return c + y * sun.radius, c + x * sun.radius


def test_hmi_is_zero_off_disk_and_obeys_hale(sun, monkeypatch):
    monkeypatch.setattr(sun, "_noise", lambda img: 0.0)
    c = (sun.res - 1) / 2
    for lat in (20.0, -20.0):
        monkeypatch.setattr(sun, "regions", [_one_region(sun, lat)])
        bz = sun.render_hmi(0.0)["Bz"]
        assert np.all(bz[~sun.on_disk] == 0) and np.abs(bz[sun.on_disk]).max() > 300
        # Image-plane coordinates in solar radii: x west with the column, y north with
        # the row (row 0 is the south edge, as in the SDOML v2 archive).
        x = y = (np.arange(sun.res) - c) / sun.radius
        (ny, nx), (py, px) = (
            np.unravel_index(bz.argmin(), bz.shape),
            np.unravel_index(bz.argmax(), bz.shape),
        )
        neg, pos = (x[nx], y[ny]), (x[px], y[py])
        lead, trail = (neg, pos) if neg[0] > pos[0] else (pos, neg)
        # cycle 24: negative leading (western) polarity in the north, positive in the south
        assert (lead is neg) == (lat > 0)
        assert abs(lead[1]) < abs(trail[1])  # Joy's law: the leading spot is closer to the equator
        assert np.sign(lead[1]) == np.sign(trail[1]) == np.sign(lat)
        # ... so in pixels: both polarities of a northern region at rows above the centre
        assert ((ny > c) and (py > c)) == (lat > 0) and ((ny < c) and (py < c)) == (lat < 0)


def test_generated_regions_follow_hale_by_hemisphere(sun, monkeypatch):
    monkeypatch.setattr(sun, "_noise", lambda img: 0.0)
    regions = sun._make_regions()
    north = [r for r in regions if r.lat > 0]
    south = [r for r in regions if r.lat < 0]
    assert north and south
    assert {r.leading_sign for r in north} == {-1.0} and {r.leading_sign for r in south} == {1.0}
    # Rendered: the leading (western, high-column) polarity is negative in the upper half
    # of the image (high rows, north) and positive in the lower half (low rows, south).
    c = (sun.res - 1) / 2
    for r in (north[0], south[0]):
        r = ActiveRegion(**{**r.__dict__, "lon": 0.0, "t_emerge": -5 * 86400, "decay": 1e7})
        monkeypatch.setattr(sun, "regions", [r])
        bz = sun.render_hmi(0.0)["Bz"]
        strong = np.abs(bz) > 0.3 * np.abs(bz).max()
        rows, cols = np.indices(bz.shape)
        assert np.all((rows[strong] > c) == (r.lat > 0))
        # the mean column of each polarity: the leading one is to the west (high columns)
        neg, pos = strong & (bz < 0), strong & (bz > 0)
        lead_sign = -1 if cols[neg].mean() > cols[pos].mean() else 1
        assert lead_sign == (-1 if r.lat > 0 else 1)


@pytest.mark.parametrize("lat", [25.0, -25.0])
def test_every_channel_puts_a_region_at_its_heliographic_position(sun, monkeypatch, lat):
    """The convention: row 0 south (north at high rows), column 0 east, in AIA and HMI alike."""
    monkeypatch.setattr(sun, "_noise", lambda img: 0.0)
    monkeypatch.setattr(sun, "flares", [])
    region = _one_region(sun, lat)
    region.lon = 30.0 - region.longitude(0.0) + region.lon  # 30 deg west at t = 0
    row, col = _pixel(sun, lat, 30.0)
    c = (sun.res - 1) / 2
    assert (row > c) == (lat > 0) and col > c  # north up, west at high columns
    monkeypatch.setattr(sun, "regions", [])
    quiet = {ch: sun.render_aia(ch, 0.0)[0] for ch in AIA_CHANNELS}
    monkeypatch.setattr(sun, "regions", [region])
    for ch in AIA_CHANNELS:
        excess = sun.render_aia(ch, 0.0)[0] - quiet[ch]
        peak = np.unravel_index(excess.argmax(), excess.shape)
        assert abs(peak[0] - row) <= 1 and abs(peak[1] - col) <= 1, ch
    hmi = sun.render_hmi(0.0)
    rows, cols = np.indices((sun.res, sun.res))
    for ch in HMI_CHANNELS:
        w = np.abs(hmi[ch]) * (np.abs(hmi[ch]) > 50)  # the region, not the network
        assert abs((w * rows).sum() / w.sum() - row) < 3, ch
        assert abs((w * cols).sum() / w.sum() - col) < 3, ch
    # Bx is positive to the west and By to the north of a positive polarity
    bz = hmi["Bz"]
    pr, pc = np.unravel_index(bz.argmax(), bz.shape)
    assert hmi["Bx"][pr, pc + 3] > 0 > hmi["Bx"][pr, pc - 3]
    assert hmi["By"][pr + 3, pc] > 0 > hmi["By"][pr - 3, pc]


def test_stored_frames_have_row_0_south(synth_root):
    """End to end, in the written store: where the truth file's active regions are at
    positive latitude, the magnetic flux is in the upper half (rows > H/2) of Bz."""
    truth = read_truth(str(synth_root))
    frames = read_truth_frames(str(synth_root))
    store = ImageStore(str(synth_root / "sdomlv2_hmi.zarr"), "hmi")
    regions = [ActiveRegion(**r) for r in truth["active_regions"]]
    epoch = np.datetime64(truth["epoch"])
    bz = frames[frames.channel == "Bz"].iloc[::6]
    agree = total = 0
    for year, group in bz.groupby("year"):
        imgs = store.read_frames(year, "Bz", group["index"].to_numpy())
        for img, t in zip(imgs, group.time.dt.tz_localize(None).to_numpy(), strict=True):
            s = (t - epoch) / np.timedelta64(1, "s")
            north = south = 0.0
            for r in regions:
                z = SyntheticSun._vector(r.lat, r.longitude(s))[2]
                if z > 0:
                    w = r.envelope(s) * r.flux * z
                    north, south = north + w * (r.lat > 0), south + w * (r.lat < 0)
            if north + south < 500 or abs(north - south) < 0.6 * (north + south):
                continue  # no clear hemisphere
            half = img.shape[0] // 2
            up, low = np.abs(img[half:]).sum(), np.abs(img[:half]).sum()
            total += 1
            agree += (up > low) == (north > south)
    assert total >= 10 and agree >= 0.9 * total, (agree, total)


def test_region_rotates_west_with_differential_rotation():
    low = ActiveRegion(0, 5.0, 0.0, 0.0, 3600, 1e7, 1000, 2, 8, 2, 1, 1)
    high = ActiveRegion(1, 35.0, 0.0, 0.0, 3600, 1e7, 1000, 2, 8, 2, 1, 1)
    assert low.longitude(86400) > high.longitude(86400) > 0
    assert math.isclose(low.longitude(86400), 13.7, abs_tol=0.2)


def test_channels_share_one_hidden_state(sun, monkeypatch):
    monkeypatch.setattr(sun, "regions", [_one_region(sun, 15.0)])
    monkeypatch.setattr(sun, "flares", [])
    imgs = {
        c: sun.render_aia(c, 0.0)[0][sun.on_disk] for c in ("171A", "193A", "211A", "335A", "94A")
    }
    for c in ("171A", "211A", "335A"):
        assert np.corrcoef(np.log(imgs["193A"]), np.log(imgs[c]))[0, 1] > 0.5, c
    quiet = np.median(imgs["193A"])
    assert imgs["193A"].max() > 3 * quiet  # the active region stands out


def test_flares_brighten_hot_channels_most(sun, monkeypatch):
    from sdofm.archive.synthetic import Flare

    monkeypatch.setattr(sun, "regions", [_one_region(sun, 15.0)])
    monkeypatch.setattr(
        sun, "flares", [Flare(t_peak=7200.0, ar_id=0, magnitude=30.0, rise=300, decay=1800)]
    )
    gain = {}
    for c in ("94A", "131A", "171A", "1700A"):
        before, peak = sun.render_aia(c, 0.0)[0].sum(), sun.render_aia(c, 7200.0)[0].sum()
        gain[c] = peak / before
    assert gain["94A"] > 1.5 and gain["131A"] > 1.5
    assert gain["94A"] > 2 * gain["171A"] - 1 and gain["131A"] > gain["171A"] > gain["1700A"] * 0.99


def test_pixel_values_in_archive_ranges(synth_root):
    cfg = small_config(synth_root)
    a = Archive.open(cfg.data)
    sdoml_mean = {"94A": 0.53, "171A": 109.5, "193A": 117.3, "1600A": 35.8, "1700A": 445.4}
    for c, mean in sdoml_mean.items():
        frames = a.aia.read_frames("2012", c, range(0, 200, 20))
        assert mean / 4 < frames.mean() < mean * 4, c
        assert frames.min() >= 0
    bz = a.hmi.read_frames("2012", "Bz", range(0, 100, 10))
    assert 100 < np.abs(bz).max() < 4000


def test_hmi_time_is_tai(synth_root):
    frames = read_truth_frames(str(synth_root))
    store = ImageStore(str(synth_root / "sdomlv2_hmi.zarr"), "hmi")
    raw = json.loads((synth_root / "sdomlv2_hmi.zarr" / "2012" / "Bz" / ".zattrs").read_text())[
        "T_OBS"
    ]
    t = store.frame_times("2012", "Bz").times
    truth = (
        frames[(frames.channel == "Bz")].sort_values("index").time.dt.tz_localize(None).to_numpy()
    )
    np.testing.assert_array_equal(t, truth)
    i = next(i for i, s in enumerate(raw) if s.startswith("2012.06.29_12:00"))
    assert t[i] == np.datetime64(
        dt.datetime(2012, 6, 29, 11, 59, 30)
    )  # TAI - 34 s, the grid minus 30 s


def test_the_synthetic_sun_is_written_only_at_the_default_root(tmp_path, monkeypatch):
    tiny = ["synth.resolution=16", "synth.periods=[{start: 2011-10-31, days: 1}]"]
    typo = tmp_path / "sdoml-typo"
    cfg = load_config(None, [*tiny, f"data.root={typo}"])
    with pytest.raises(
        SDOMLError,
        match=rf"no AIA store under {typo} \(looked for sdomlv2\.zarr, sdomlv2_small\.zarr, "
        rf"AIA\.zarr\): {typo} does not exist",
    ):
        ensure_data(cfg.data, cfg.synth)
    assert not typo.exists()  # nothing fabricated
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, tiny)  # data.root: the default, data/synthetic
    assert ensure_data(cfg.data, cfg.synth) is True
    assert (tmp_path / "data" / "synthetic" / "sdomlv2.zarr" / "2011" / "171A").is_dir()
    assert ensure_data(cfg.data, cfg.synth) is False


def test_the_quiet_sun_follows_the_magnetic_network(monkeypatch):
    """With synth.network_variability the quiet levels, the HMI network and the EVE lines
    move with s(t) as its closed form from the truth file's periods and phases says, each
    AIA channel by its own share; 0 (the default) leaves the constant quiet Sun of before."""
    cfg = small_config("unused", "synth.resolution=64", "synth.network_variability=0.3").synth
    sun, still = SyntheticSun(cfg), SyntheticSun(cfg.model_copy(update={"network_variability": 0}))
    for s in (sun, still):
        monkeypatch.setattr(s, "_noise", lambda img: 0.0)
        monkeypatch.setattr(s, "regions", [])
        monkeypatch.setattr(s, "flares", [])
    from sdofm.archive.synthetic.write import _truth

    net = _truth(sun)["network"]
    times = np.array([0.0, 3.1, 9.7, 20.2]) * 86400
    s_hand = np.array(
        [
            sum(
                math.sin(2 * math.pi * t / p + f)
                for p, f in zip(net["periods_s"], net["phases"], strict=True)
            )
            / math.sqrt(2)
            for t in times
        ]
    )
    assert np.ptp(s_hand) > 0.5  # the state moves over these weeks
    for ch in ("211A", "171A", "1700A"):
        w = net["aia_response"][ch]
        for t, s in zip(times, s_hand, strict=True):
            ratio = sun.render_aia(ch, t)[0] / still.render_aia(ch, t)[0]
            on = still.render_aia(ch, t)[0] > 0
            np.testing.assert_allclose(ratio[on], 1 + 0.3 * w * s, rtol=1e-5)
    t = times[2]
    bz = sun.render_hmi(t)["Bz"][sun.on_disk]
    np.testing.assert_allclose(
        bz, (1 + 0.3 * s_hand[2]) * still.render_hmi(t)["Bz"][sun.on_disk], rtol=1e-5, atol=1e-4
    )
    # EVE: each line by 0.5 + hot / 2, hot = the logistic of its formation temperature
    from sdofm.constants import EVE_LINE_TABLE

    hot = np.array([1 / (1 + math.exp(-(logt - 6.6) * 6)) for _, _, logt in EVE_LINE_TABLE])
    ratio = sun.eve_irradiance(times) / still.eve_irradiance(times)  # the same 1 % noise draws
    np.testing.assert_allclose(ratio, 1 + 0.3 * (0.5 + 0.5 * hot) * s_hand[:, None], rtol=1e-5)
    # The default Sun is the one of before: its quiet level does not move at all.
    a, b = (still.render_aia("211A", x)[0] for x in times[:2])
    np.testing.assert_array_equal(a, b)


def test_coronal_eve_lines_see_each_region_through_its_temperature(monkeypatch):
    """With synth.eve_temperature_width each coronal line's active-region term weighs every
    region by a Gaussian in log T around the line's formation temperature (normalised to the
    mean over the regions' temperatures), computed here by hand for two regions of known
    temperature; the lines formed below 10^6 K and every line of the default Sun keep the
    flux-only term, whose closed form is checked too."""
    from sdofm.constants import EVE_LINE_TABLE

    cfg = small_config("unused", "synth.resolution=64").synth
    sun = SyntheticSun(cfg.model_copy(update={"eve_temperature_width": 0.15}))
    flat = SyntheticSun(cfg)
    times = np.array([2.0, 2.5]) * 86400
    temps = (0.6, 1.4)  # log T 6.1 and 6.9
    for s in (sun, flat):
        monkeypatch.setattr(s, "flares", [])
        quiet = SimpleNamespace(standard_normal=np.zeros)  # no 1 % noise
        monkeypatch.setattr(s, "rng_eve", quiet)
        visible = [(r, 1.0, 0, 0, 1) for r in s.regions[:2]]
        for r, temp in zip(s.regions[:2], temps, strict=True):
            monkeypatch.setattr(r, "temperature", temp)
            monkeypatch.setattr(r, "flux", 1000.0)
        monkeypatch.setattr(s, "activity", lambda t, v=visible: v)
    grid = np.linspace(6.0, 7.0, 1001)  # log T of the regions' uniform temperatures
    for j, (_, wl, logt) in enumerate(EVE_LINE_TABLE):
        base = 1e-4 * (1 + 0.3 * math.sin(wl))
        hot = 1 / (1 + math.exp(-(logt - 6.6) * 6))
        if logt >= 6.0:
            g = [math.exp(-0.5 * ((lt - logt) / 0.15) ** 2) for lt in (6.1, 6.9)]
            act = sum(g) / np.exp(-0.5 * ((grid - logt) / 0.15) ** 2).mean()
        else:
            act = 2.0
        want = base * (1 + 0.1 * (0.5 + hot) * act)
        np.testing.assert_allclose(sun.eve_irradiance(times)[:, j], want, rtol=1e-5)
        np.testing.assert_allclose(
            flat.eve_irradiance(times)[:, j], base * (1 + 0.1 * (0.5 + hot) * 2.0), rtol=1e-5
        )
    # A line formed at 6.9 sees the hot region far more than the cool one: the two lines
    # of different temperatures now move apart where flux alone moved them together.
    w = sun.eve_temperature_weight(6.9)
    assert w(1.4) > 10 * w(0.6)

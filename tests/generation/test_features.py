"""Features read from frames, corruptions of frames, and the calibration of the metrics
against hand-made frames whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sdofm.generation import CORRUPTIONS, Calibrator, applicable, summarise, summary_rows
from sdofm.generation.calibration import worse
from sdofm.generation.corruptions import NOISE_STD, SEAM_PERIOD_PX, SEAM_STD
from sdofm.generation.features import (
    RandomConvNet,
    disk_geometry,
    physical_features,
    physical_names,
)

CH = ["171A", "193A", "Bz"]
H = 64  # disk radius 25.5 px, centre 31.5


def bipole_frame(north_leading: float, south_leading: float) -> np.ndarray:
    """(3, 64, 64): 171A a smooth field, 193A = 2 x 171A + 3 (correlation 1), Bz two bipoles
    at row 45 (north, y = 13.5 / 25.5) and row 18 (south), leading (west) polarity given."""
    rng = np.random.default_rng(0)
    aia = ndimage.gaussian_filter(rng.normal(size=(H, H)), 3)
    bz = np.zeros((H, H))
    for row, lead in ((45, north_leading), (18, south_leading)):
        bz[row, 28:30] = -lead * 0.9  # east: the following polarity
        bz[row, 31:33] = lead * 0.9  # west: leading, 1 px apart (one region)
    return np.stack([aia, 2 * aia + 3, bz]).astype(np.float32)


def test_physical_features_of_a_hand_made_sun():
    frames = np.stack([bipole_frame(-1, +1), bipole_frame(+1, -1)])  # Hale, then anti-Hale
    f = physical_features(frames, CH)
    names = physical_names(CH)
    assert f.shape == (2, len(names)) == (2, 5 + 3 * 4 + 3)
    v = {n: f[:, i] for i, n in enumerate(names)}
    np.testing.assert_array_equal(v["ar_count"], [2, 2])
    lat_n, lat_s = np.degrees(np.arcsin(13.5 / 25.5)), np.degrees(np.arcsin(13.5 / 25.5))
    np.testing.assert_allclose(v["ar_lat_north"], lat_n)
    np.testing.assert_allclose(v["ar_lat_south"], lat_s)
    np.testing.assert_allclose(v["lead_north"], [-1, 1])
    np.testing.assert_allclose(v["lead_south"], [1, -1])
    np.testing.assert_allclose(v["corr_171A_193A"], 1.0, atol=1e-9)
    # The limb profile: the mean of each annulus, by hand.
    x, y, r = disk_geometry(H)
    ring = (r >= 0.9) & (r < 1.0)
    np.testing.assert_allclose(v["limb_193A_0.9-1.0"], frames[:, 1, ring].mean(-1), rtol=1e-6)


def test_the_polarity_flip_breaks_hales_law_and_nothing_else():
    frame = bipole_frame(-1, +1)[None]
    flipped = CORRUPTIONS["flip_polarity"](frame, CH, np.random.default_rng(0))
    north = disk_geometry(H)[1] > 0
    np.testing.assert_array_equal(flipped[0, 2, north], -frame[0, 2, north])
    np.testing.assert_array_equal(flipped[0, 2, ~north], frame[0, 2, ~north])
    np.testing.assert_array_equal(flipped[:, :2], frame[:, :2])
    v = dict(zip(physical_names(CH), physical_features(flipped, CH)[0], strict=True))
    assert v["lead_north"] == 1 and v["lead_south"] == 1


def test_corruptions_do_what_they_say_and_leave_the_input_alone():
    rng = np.random.default_rng(1)
    frames = rng.normal(size=(6, 3, 32, 32)).astype(np.float32)
    keep = frames.copy()
    out = {name: CORRUPTIONS[name](frames, CH, np.random.default_rng(2)) for name in CORRUPTIONS}
    np.testing.assert_array_equal(frames, keep)
    np.testing.assert_array_equal(out["swap_channels"][:, [1, 0, 2]], frames)
    np.testing.assert_allclose(out["scale_channel"][:, 0], 0.7 * frames[:, 0])
    np.testing.assert_array_equal(out["scale_channel"][:, 1:], frames[:, 1:])
    sd = frames.std(axis=(0, 2, 3))
    diff = out["noise"] - frames
    np.testing.assert_allclose(diff.std(axis=(0, 2, 3)), NOISE_STD * sd, rtol=0.05)
    seam = out["block_seams"] - frames
    on = np.zeros((32, 32), bool)
    on[::SEAM_PERIOD_PX] = on[:, ::SEAM_PERIOD_PX] = True
    np.testing.assert_array_equal(seam[..., ~on], 0)
    np.testing.assert_allclose(seam[:, :, 1, 0], SEAM_STD * sd[None].repeat(6, 0), rtol=1e-5)
    # Blur: the mean kept (reflecting edges), high frequencies gone.
    np.testing.assert_allclose(out["blur"].mean(), frames.mean(), atol=1e-6)
    assert (
        np.abs(np.diff(out["blur"], axis=-1)).mean() < 0.5 * np.abs(np.diff(frames, axis=-1)).mean()
    )
    assert applicable(["171A"]) == ["blur", "noise", "block_seams", "scale_channel"]
    assert applicable(CH) == list(CORRUPTIONS)


def test_the_random_network_is_fixed_by_its_seed():
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32))
    import torch

    t = torch.as_tensor(x, dtype=torch.float32)
    torch.manual_seed(123)  # the global seed plays no part
    a = RandomConvNet(3, seed=7)(t)
    torch.manual_seed(456)
    b = RandomConvNet(3, seed=7)(t)
    assert torch.equal(a, b) and a.shape == (2, 112)
    assert not torch.equal(a, RandomConvNet(3, seed=8)(t))


def test_summaries_refuse_nan_frames():
    frames = np.zeros((2, 3, 32, 32), np.float32)
    frames[1, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        summarise(frames, CH)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        summarise(frames[:, :2], CH)


def suns(n: int, seed: int) -> np.ndarray:
    """n frames of a toy Sun at 32 px: smooth AIA fields, a Hale bipole per hemisphere at a
    random longitude."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 3, 32, 32), np.float32)
    for i in range(n):
        aia = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 2) * 4
        out[i, 0], out[i, 1] = aia, 0.8 * aia + 0.3 * rng.normal(size=(32, 32))
        for row, lead in ((22, -1.0), (9, 1.0)):
            c = int(rng.integers(10, 20))
            out[i, 2, row, c - 2 : c] = -lead
            out[i, 2, row, c + 1 : c + 3] = lead
    return out


def test_calibration_separates_corruptions_from_the_floor_and_ranks_generators():
    real = suns(48, 0)
    rng = np.random.default_rng(3)
    s = summarise(real, CH)
    corrupted = {name: summarise(f(real, CH, rng), CH) for name, f in CORRUPTIONS.items()}
    corrupted["nothing"] = s  # the same frames: must never read as separated
    train = suns(40, 1)
    cal_ = Calibrator(s, splits=4, seed=0, window=8, train=summarise(train, CH))
    copies = summarise(train + 0.01 * rng.normal(size=train.shape).astype(np.float32), CH)
    cal = cal_.calibrate(corrupted, copies)
    for m in cal.metrics:
        assert "nothing" not in cal.separates(m), m
    assert "block_seams" in cal.separates("seams")
    assert "flip_polarity" in cal.separates("fd/physical")
    assert {"blur", "noise"} <= set(cal.separates("spectrum"))
    assert cal.separates("seams") == ["block_seams"]  # nothing else is periodic at 8 px
    # Memorisation: held-out halves read ~1, near copies of the training set far below.
    assert 0.8 < cal.memorisation["floor"].mean() < 1.25
    assert cal.memorises("copies")

    # A "generator" drawing new frames of the same toy Sun beats one that blurs them.
    cal_.add_arm(cal, "good", summarise(suns(48, 2), CH))
    cal_.add_arm(cal, "blurry", summarise(CORRUPTIONS["blur"](suns(48, 2), CH, rng), CH))
    # Every metric that tells blur from the floor also tells the blurry generator's frames
    # from new ones (and there are several).
    by_blur = [m for m in cal.metrics if "blur" in cal.separates(m)]
    assert len(by_blur) >= 3 and "spectrum" in by_blur
    for m in by_blur:
        assert cal.improves(m, "good", "blurry"), m
    assert not cal.memorises("good")
    rows = {r["metric"]: r for r in summary_rows(cal, ["good", "blurry"], baseline="blurry")}
    assert rows["spectrum"]["good_improves"] and rows["spectrum"]["calibrated"]
    assert rows["spectrum"]["good"] < rows["spectrum"]["blurry"]


def test_worse_reads_the_direction_of_each_metric():
    assert worse("fd/physical", np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert not worse("fd/physical", np.array([2.0, 4.0]), np.array([1.0, 2.0]))
    assert worse("precision/physical", np.array([0.2, 0.3]), np.array([0.8, 0.9]))
    assert not worse("recall/encoder", np.array([0.9]), np.array([0.2]))

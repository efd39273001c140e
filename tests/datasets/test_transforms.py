import numpy as np
import pytest

from sdofm.config import TransformConfig
from sdofm.constants import disk_radius_px
from sdofm.datasets import transforms as T
from sdofm.datasets.blocks import make_preprocessor


def _preprocessor(
    channels,
    size,
    stats=None,
    limb="keep_corona",
    out_size=None,
    dtype="float32",
    magnetogram="zscore",
):
    """The chain for ``channels`` with the SDOML default scaling; ``stats``: {channel: {mean, std}}."""
    transform = TransformConfig(
        size=out_size, limb=limb, dtype=dtype, zscore=stats is not None, magnetogram=magnetogram
    )
    return make_preprocessor(
        channels, transform, size, None if stats is None else {"channels": stats}
    )


# --------------------------------------------------------------------------------------------
# physical units


def test_exposure_normalise_per_channel_and_floor():
    x = np.full((3, 2, 2), 10.0, dtype=np.float32)
    out = T.exposure_normalise(x, [2.0, 0.5, 0.0])
    # exptime 0 is floored at 0.01 s
    np.testing.assert_allclose(out[:, 0, 0], [5.0, 20.0, 1000.0], rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(x, 10.0)


def test_exposure_normalise_scalar_and_time_axis():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(T.exposure_normalise(x, 4.0), x / 4.0)
    with pytest.raises(ValueError, match="shape"):
        T.exposure_normalise(x, [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------------------------
# scaling


def test_scale_methods_exact_values():
    x = np.array([[[-5.0, 50.0]], [[0.001, 1000.0]], [[-4.0, 16.0]], [[0.0, 2.0]]], np.float32)
    y = T.scale(
        x,
        ["linear", "log", "sqrt", "asinh"],
        clip_min=[0.0, 0.1, None, None],
        clip_max=[10.0, 100.0, None, None],
        softening=[1.0, 1.0, 1.0, 2.0],
    )
    np.testing.assert_allclose(y[0], [[0.0, 10.0]])
    np.testing.assert_allclose(y[1], [[-1.0, 2.0]], rtol=1e-6)
    # sqrt clips negatives at 0 even without a clip_min
    np.testing.assert_allclose(y[2], [[0.0, 4.0]])
    np.testing.assert_allclose(y[3], [[0.0, np.arcsinh(1.0)]], rtol=1e-6)
    assert y.dtype == np.float32


def test_scale_single_method_scalar_clips_on_time_axis():
    x = np.array([1.0, 10.0, 1e4], np.float32).reshape(1, 3, 1, 1)
    y = T.scale(x, "log", clip_min=1.0, clip_max=1000.0)
    np.testing.assert_allclose(y.ravel(), [0.0, 1.0, 3.0], rtol=1e-6)


def test_scale_does_not_modify_input():
    x = np.array([[[0.5, 20.0]]], np.float32)
    before = x.copy()
    T.scale(x, "log", clip_min=1.0, clip_max=10.0)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("bad", [0.0, -1.0, None])
def test_log_requires_positive_clip_min_naming_channel(bad):
    x = np.ones((3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="channel 2"):
        T.scale(x, ["log", "linear", "log"], clip_min=[1.0, None, bad], clip_max=None)


def test_scale_rejects_unknown_method_and_bad_lengths():
    x = np.ones((2, 2, 2), np.float32)
    with pytest.raises(ValueError, match="cube"):
        T.scale(x, ["linear", "cube"])
    with pytest.raises(ValueError, match="length 2"):
        T.scale(x, ["linear"])
    with pytest.raises(ValueError, match="clip_min"):
        T.scale(x, "linear", clip_min=[0.0, 1.0, 2.0])


def test_default_scaling_table_and_scaling_params():
    assert T.DEFAULT_SCALING["171A"] == ("log", 5.0, 3500.0)
    assert T.DEFAULT_SCALING["1700A"] == ("log", 220.0, 5000.0)
    assert T.DEFAULT_SCALING["Bz"] == ("asinh", -1500.0, 1500.0)
    methods, lo, hi, softening = T.scaling_params(["94A", "Bx", "304A"])
    assert methods == ("log", "asinh", "log")
    assert lo == (0.1, -1500.0, 0.1)
    assert hi == (800.0, 1500.0, 3500.0)
    assert softening == (1.0, 50.0, 1.0)
    # every default log channel has a valid clip_min
    assert all(lo > 0 for m, lo, _ in T.DEFAULT_SCALING.values() if m == "log")


def test_scaling_params_unknown_channel():
    with pytest.raises(KeyError, match=r"'4500A'.*171A"):
        T.scaling_params(["171A", "4500A"])


# --------------------------------------------------------------------------------------------
# z-score


def test_zscore_values():
    x = np.array([[[1.0, 3.0]], [[10.0, 30.0]]], np.float32)
    y = T.zscore(x, mean=[2.0, 20.0], std=[1.0, 10.0])
    np.testing.assert_allclose(y, [[[-1.0, 1.0]], [[-1.0, 1.0]]])


def test_zscore_zero_std_is_finite():
    x = np.array([[[5.0, 5.0]], [[1.0, 2.0]]], np.float32)
    y = T.zscore(x, mean=[5.0, 1.0], std=[0.0, 1.0])
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0], 0.0)
    z = T.zscore(np.array([[[5.0 + 1e-6]]], np.float32), 5.0, 0.0)
    assert np.isfinite(z).all() and abs(z.item()) < 10


def test_zscore_broadcasts_over_time_axis():
    x = np.ones((2, 4, 3, 3), np.float32)
    y = T.zscore(x, [1.0, 0.0], [1.0, 2.0])
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_array_equal(y[1], 0.5)


# --------------------------------------------------------------------------------------------
# limb


def test_disk_mask_small_exact():
    m = T.disk_mask(5, 1.0)
    expected = np.zeros((5, 5), bool)
    expected[2, 1:4] = expected[1:4, 2] = True
    np.testing.assert_array_equal(m, expected)
    # off-centre: disk of radius 0 is the single centre pixel
    m = T.disk_mask((4, 6), 0.0, center=(1, 4))
    assert m.sum() == 1 and m[1, 4]


def test_disk_mask_area_close_to_pi_r2():
    r = disk_radius_px(512)
    assert r == pytest.approx(204.0)
    area = T.disk_mask(512, r).sum()
    assert area == pytest.approx(np.pi * r**2, rel=0.02)
    r64 = disk_radius_px(64)
    assert T.disk_mask(64, r64).sum() == pytest.approx(np.pi * r64**2, rel=0.02)


def test_apply_limb_keep_corona_zeroes_only_magnetograms():
    x = np.full((2, 3, 16, 16), 7.0, np.float32)
    out = T.apply_limb(x, "keep_corona", is_magnetogram=[False, True], radius_px=5.0)
    on = T.disk_mask(16, 5.0)
    np.testing.assert_array_equal(out[0], 7.0)  # EUV corona kept
    np.testing.assert_array_equal(out[1][:, on], 7.0)
    np.testing.assert_array_equal(out[1][:, ~on], 0.0)
    np.testing.assert_array_equal(x, 7.0)  # input untouched


def test_apply_limb_mask_off_disk_fills_every_channel():
    x = np.full((2, 16, 16), 3.0, np.float32)
    out = T.apply_limb(x, "mask_off_disk", [False, True], fill=-1.0)
    on = T.disk_mask(16, disk_radius_px(16))
    assert 0 < on.sum() < on.size
    for c in range(2):
        np.testing.assert_array_equal(out[c][on], 3.0)
        np.testing.assert_array_equal(out[c][~on], -1.0)


def test_apply_limb_invalid_mode_lists_valid_modes():
    x = np.ones((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="keep_corona.*mask_off_disk"):
        T.apply_limb(x, "zero_hmi", [True])
    with pytest.raises(ValueError, match="is_magnetogram"):
        T.apply_limb(x, "keep_corona", [True, False])


# --------------------------------------------------------------------------------------------
# resolution


def test_downsample_exact_block_means():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out = T.downsample(x, 2)
    np.testing.assert_array_equal(out, [[[2.5, 4.5], [10.5, 12.5]]])
    np.testing.assert_array_equal(T.downsample(x, 4), [[[7.5]]])
    np.testing.assert_array_equal(T.downsample(x, 1), x)
    assert T.downsample(x, 1) is not x


def test_downsample_time_axis_and_to_size():
    x = np.random.default_rng(1).random((3, 2, 512, 512), dtype=np.float32)
    for size in (256, 128, 64):
        out = T.downsample_to(x, size)
        assert out.shape == (3, 2, size, size) and out.dtype == np.float32
        k = 512 // size
        np.testing.assert_allclose(
            out[2, 1, 3, 5], x[2, 1, 3 * k : 4 * k, 5 * k : 6 * k].mean(), rtol=1e-5
        )


def test_downsample_indivisible_raises_with_shape_and_factor():
    x = np.ones((2, 10, 10), np.float32)
    with pytest.raises(ValueError, match=r"\(2, 10, 10\).*factor 3"):
        T.downsample(x, 3)
    with pytest.raises(ValueError, match=r"\(2, 10, 10\)"):
        T.downsample_to(x, 3)


# --------------------------------------------------------------------------------------------
# dimming


def test_dim_multiplies_each_channel_exactly():
    x = np.array([[[2.0, 4.0]], [[8.0, 1.0]]], np.float32)
    out = T.dim(x, np.array([0.5, 0.25], np.float32))
    np.testing.assert_array_equal(out, [[[1.0, 2.0]], [[2.0, 0.25]]])
    np.testing.assert_array_equal(x, [[[2.0, 4.0]], [[8.0, 1.0]]])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        T.dim(x, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        T.dim(x, [0.5, 1.5])


def test_sample_dimming_factors_range_and_reproducible():
    a = T.sample_dimming_factors(np.random.default_rng(42), 9, alpha_min=0.3)
    b = T.sample_dimming_factors(np.random.default_rng(42), 9, alpha_min=0.3)
    c = T.sample_dimming_factors(np.random.default_rng(43), 9, alpha_min=0.3)
    assert a.shape == (9,) and a.dtype == np.float32
    assert np.all((a >= 0.3) & (a <= 1.0))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    many = T.sample_dimming_factors(np.random.default_rng(0), 10_000)
    assert many.min() >= 0.01 and many.max() <= 1.0 and many.min() < 0.05


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_sample_dimming_factors_validates_alpha_min(bad):
    with pytest.raises(ValueError, match="alpha_min"):
        T.sample_dimming_factors(np.random.default_rng(0), 3, alpha_min=bad)


# --------------------------------------------------------------------------------------------
# Preprocessor


def test_preprocessor_downsamples_in_physical_units_before_log():
    # 1 EUV channel, 4x4 with 2x2 blocks of {1, 100, 100, 100}: mean-then-log != log-then-mean
    block = np.array([[1.0, 100.0], [100.0, 100.0]], np.float32)
    x = np.tile(block, (2, 2))[None]
    pre = T.Preprocessor(
        channels=("171A",),
        methods=("log",),
        clip_min=(0.5,),
        clip_max=(1000.0,),
        is_magnetogram=(False,),
        mean=(1.0,),
        std=(0.5,),
        out_size=2,
    )
    out = pre(x)
    expected = (np.log10(block.mean()) - 1.0) / 0.5
    assert out.shape == (1, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert not np.allclose(out, (np.log10(block).mean() - 1.0) / 0.5)


def test_preprocessor_order_limb_before_scale_matches_manual():
    rng = np.random.default_rng(3)
    channels = ["171A", "304A", "Bz"]
    x = np.empty((3, 2, 32, 32), np.float32)
    x[:2] = rng.uniform(1.0, 4000.0, size=(2, 2, 32, 32))
    x[2] = rng.uniform(-2000.0, 2000.0, size=(2, 32, 32))
    stats = {
        "171A": {"mean": 2.5, "std": 0.4},
        "304A": {"mean": 1.5, "std": 0.6},
        "Bz": {"mean": 0.0, "std": 300.0},
    }
    pre = _preprocessor(channels, size=32, stats=stats, limb="mask_off_disk", out_size=16)
    assert pre.is_magnetogram == (False, False, True)
    assert pre.radius_px == pytest.approx(disk_radius_px(16))

    y = T.downsample_to(x, 16)
    y = T.apply_limb(y, "mask_off_disk", [False, False, True], disk_radius_px(16))
    y = T.scale(y, *T.scaling_params(channels))
    y = T.zscore(y, [2.5, 1.5, 0.0], [0.4, 0.6, 300.0])
    out = pre(x)
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)
    # off-disk EUV was set to 0 in physical units, so it reads as log10(clip_min) after scaling
    off = ~T.disk_mask(16, pre.radius_px)
    np.testing.assert_allclose(out[0][:, off], (np.log10(5.0) - 2.5) / 0.4, rtol=1e-5)


def test_preprocessor_keep_corona_no_stats_dtype_and_input_untouched():
    rng = np.random.default_rng(7)
    x = rng.uniform(-3000.0, 6000.0, size=(4, 64, 64)).astype(np.float32)
    x[0] = np.abs(x[0])
    before = x.copy()
    pre = _preprocessor(["193A", "1600A", "Bx", "By"], size=64, dtype="float16")
    out = pre(x)
    np.testing.assert_array_equal(x, before)
    assert out.dtype == np.float16 and out.shape == x.shape
    assert np.isfinite(out).all()
    off = ~T.disk_mask(64, disk_radius_px(64))
    np.testing.assert_array_equal(out[2:][:, off], 0.0)  # magnetograms zero off disk
    # EUV corona kept: off-disk values are the scaled inputs, not a constant fill
    expected = np.log10(np.clip(x[0][off], 20.0, 5500.0)).astype(np.float16)
    np.testing.assert_array_equal(out[0][off], expected)
    hmi = np.arcsinh(np.clip(x[2][~off].astype(np.float64), -1500, 1500) / 50)
    np.testing.assert_allclose(out[2][~off], hmi, rtol=2e-3, atol=2e-3)


def test_magnetograms_get_one_fixed_physical_scale_whatever_the_statistics():
    """HMI: asinh(clip(B, +-1500 G) / 50 G) / asinh(1500 / 50), in [-1, 1]; the statistics
    (here absurd for Bz) only standardise AIA."""
    rng = np.random.default_rng(3)
    x = rng.uniform(1.0, 4000.0, size=(2, 1, 32, 32)).astype(np.float32)
    x[1] = rng.normal(0, 800, size=(1, 32, 32))
    x[1, 0, 16, 14:18] = [-5000.0, -1500.0, 1500.0, 5000.0]  # beyond and at the clip
    stats = {"171A": {"mean": 2.5, "std": 0.4}, "Bz": {"mean": 40.0, "std": 3.0}}
    out = _preprocessor(["171A", "Bz"], 32, stats=stats, magnetogram="fixed")(x)
    b = np.clip(x[1].astype(np.float64), -1500, 1500)
    on = T.disk_mask(32, disk_radius_px(32))
    closed = np.where(on, np.arcsinh(b / 50.0) / np.arcsinh(1500.0 / 50.0), 0.0)
    np.testing.assert_allclose(out[1], closed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1, 0, 16, 14:18], [-1, -1, 1, 1], rtol=1e-6)
    aia = (np.log10(np.clip(x[0].astype(np.float64), 5.0, 3500.0)) - 2.5) / 0.4
    np.testing.assert_allclose(out[0], aia, rtol=1e-5, atol=1e-5)
    # The same field gives the same input whatever month the statistics came from.
    other = {"171A": stats["171A"], "Bz": {"mean": -7.0, "std": 90.0}}
    np.testing.assert_array_equal(
        out, _preprocessor(["171A", "Bz"], 32, other, magnetogram="fixed")(x)
    )
    # zscore: the statistics standardise Bz too.
    z = _preprocessor(["171A", "Bz"], 32, stats=stats, magnetogram="zscore")(x)
    np.testing.assert_allclose(
        z[1], np.where(on, (np.arcsinh(b / 50.0) - 40.0) / 3.0, -40 / 3), rtol=1e-5, atol=1e-5
    )


def test_preprocessor_output_nan_free_for_extreme_finite_input():
    x = np.array([0.0, -1e30, 1e30, 1e-30], np.float32).reshape(1, 2, 2).repeat(4, axis=0)
    pre = _preprocessor(
        ["94A", "335A", "Bz", "1700A"],
        size=2,
        stats={c: {"mean": 0.0, "std": 0.0} for c in ["94A", "335A", "Bz", "1700A"]},
    )
    out = pre(x)
    assert np.isfinite(out).all()


def test_preprocessor_validation():
    with pytest.raises(KeyError, match="Bz"):
        _preprocessor(["171A", "Bz"], size=16, stats={"171A": {"mean": 0.0, "std": 1.0}})
    with pytest.raises(ValueError, match="limb"):
        _preprocessor(["171A"], size=16, limb="zero_hmi")
    with pytest.raises(ValueError, match="dtype"):
        _preprocessor(["171A"], size=16, dtype="float64")
    with pytest.raises(ValueError, match="channel 0"):
        T.Preprocessor(("x",), ("log",), (0.0,), (1.0,), (False,))
    pre = _preprocessor(["171A", "Bz"], size=8)
    with pytest.raises(ValueError, match="channels"):
        pre(np.ones((3, 8, 8), np.float32))


def test_preprocessor_channel_equals_the_full_chain_on_that_channel():
    chans = ["171A", "304A", "Bz"]
    stats = {c: {"mean": 0.5 * i, "std": 1.0 + i} for i, c in enumerate(chans)}
    pre = _preprocessor(chans, 16, stats=stats)
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 1000, size=(3, 2, 16, 16)).astype(np.float32)
    full = pre(x)
    for i in range(3):
        np.testing.assert_allclose(pre.channel(i)(x[i : i + 1]), full[i : i + 1], rtol=1e-6)

"""Missing channel: PSNR, SSIM and pixel correlation against closed forms and a brute-force
reference, the withheld input, the heads, and a short run on the session store that must
beat the train-mean guess."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sdofm.cli import app
from sdofm.config import ConfigError, load_config
from sdofm.finetuning.image_metrics import SSIM_K1, SSIM_K2, pixel_correlation, psnr, ssim
from sdofm.finetuning.run import prepare, train_head
from sdofm.finetuning.tasks import get_task
from sdofm.finetuning.tasks.missing_channel import held_out_channels, withhold
from sdofm.models import get_model
from sdofm.models.heads import BaselineReconstructor, EncoderReconstructor
from tests.conftest import small_config
from tests.finetuning.test_dimming import _checkpoint


def test_psnr_closed_form():
    x = torch.rand(3, 16, 16)
    for d, r in ((0.1, 1.0), (0.02, 2.5)):
        got = psnr(x + d, x, r)
        torch.testing.assert_close(
            got, torch.full((3,), 20 * math.log10(r / d), dtype=torch.float64)
        )
    assert torch.isinf(psnr(x, x, 1.0)).all()


def _ssim_brute_force(x: np.ndarray, y: np.ndarray, r: float, size=11, sigma=1.5) -> float:
    """SSIM of Wang et al. (2004), window by window with an explicit 2-D Gaussian."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(vals))


def test_ssim_closed_forms_and_brute_force_reference():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 16, 16))
    y = x + rng.normal(0, 0.1, x.shape)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    torch.testing.assert_close(ssim(tx, tx, 1.0), torch.ones(2, dtype=torch.float64))
    got = ssim(tx, ty, 1.0)
    for i in range(2):
        assert float(got[i]) == pytest.approx(_ssim_brute_force(x[i], y[i], 1.0), rel=1e-9)
    assert 0 < float(got.min()) < 1
    # Constant images a and b: the structure term is C2 / C2, the luminance term is exact.
    a, b, r = 0.3, 0.7, 1.0
    c1 = (SSIM_K1 * r) ** 2
    s = ssim(torch.full((1, 12, 12), a), torch.full((1, 12, 12), b), r)
    assert float(s) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    # A window larger than the image shrinks to it (one position), still Wang's formula.
    small = rng.uniform(0, 1, (2, 7, 7))
    got = float(ssim(torch.from_numpy(small[:1]), torch.from_numpy(small[1:]), 1.0, window=11))
    assert got == pytest.approx(_ssim_brute_force(small[0], small[1], 1.0, size=7), rel=1e-9)


def test_pixel_correlation_closed_forms():
    x = torch.rand(2, 8, 8)
    torch.testing.assert_close(pixel_correlation(x, 3 * x + 2), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(pixel_correlation(x, -x), -torch.ones(2, dtype=torch.float64))
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    b = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]])
    assert float(pixel_correlation(a, b)) == pytest.approx(0.8)  # by hand: 4 / 5
    assert math.isnan(float(pixel_correlation(a, torch.ones_like(a))))


def test_withheld_channels_are_zeroed_and_returned_as_targets():
    image = np.random.default_rng(1).normal(size=(2, 12, 1, 8, 8)).astype(np.float32)
    keep = image.copy()
    x, y = withhold(image, [0, 11])
    assert (x[:, [0, 11]] == 0).all() and np.array_equal(x[:, 1:11], image[:, 1:11])
    assert np.array_equal(y, image[:, [0, 11]]) and np.array_equal(image, keep)


def test_held_out_and_head_are_checked_naming_the_setting():
    task = get_task("missing-channel")
    assert held_out_channels(load_config(None, ["finetune.held_out=[Bz, 94A]"])) == [11, 0]
    with pytest.raises(ConfigError, match=r"held_out \['Bz'\] not among the data channels"):
        task.check(load_config(None, ["finetune.held_out=[Bz]", "data.hmi_channels=[]"]))
    with pytest.raises(ConfigError, match="keep at least one"):
        task.check(load_config(None, ["data.hmi_channels=[]", "data.aia_channels=[94A]"]))
    with pytest.raises(ConfigError, match="unknown channel '4500A'"):
        load_config(None, ["finetune.held_out=[4500A]"])
    r = CliRunner().invoke(app, ["finetune", "missing-channel", "finetune.head=pool"])
    assert r.exit_code == 2 and "finetune.head pool gives one vector" in r.output, r.output
    r = CliRunner().invoke(app, ["finetune", "nosuch"])
    assert r.exit_code == 2 and "unknown finetuning task 'nosuch'" in r.output, r.output


def test_dense_heads_give_images_and_gradients_reach_the_encoder():
    encoder = get_model("mae_debug", num_frames=2).encoder()
    model = EncoderReconstructor(encoder, 2, (12, 2, 32, 32), 16, "full")
    x = torch.randn(3, 12, 2, 32, 32)
    out = model(x)
    assert out.shape == (3, 2, 2, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert BaselineReconstructor(12, 2, 1, 8)(x).shape == (3, 1, 2, 32, 32)


@pytest.mark.usefixtures("ray_session")
def test_reconstructs_94a_better_than_the_train_mean(synth_root, tmp_path):
    _checkpoint(tmp_path / "backbone", channels=load_config().data.channels)
    cfg = small_config(
        synth_root,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"finetune.backbone={tmp_path / 'backbone'}",
        "finetune.held_out=[94A]",
        "finetune.head=conv",
        "finetune.hidden=32",
        "finetune.freeze=full",
        "finetune.epochs=4",
        "finetune.batch_size=16",
        "finetune.lr=2e-3",
        "loader.readers=1",
        "scaling.cpus_per_worker=0.25",
    )
    task = get_task("missing-channel")
    prepared = prepare(cfg, task)
    # The control, from the test split itself: 94A at its train mean (0 after the z-score).
    y = np.concatenate(
        [b["image"][:, 0] for b in prepared.datasets["test"].iter_batches(batch_format="numpy")]
    )
    mean_guess_mse = float((y.astype(np.float64) ** 2).mean())

    m = train_head(cfg, task, prepared, None, "head", str(tmp_path / "runs")).metrics
    print({k: round(v, 4) for k, v in m.items() if k.startswith("test/")}, mean_guess_mse)
    assert set(m) >= {"test/psnr_94A", "test/ssim_94A", "test/corr_94A", "val/mse"}
    assert m["test/mse"] < 0.5 * mean_guess_mse, (m["test/mse"], mean_guess_mse)
    assert m["test/corr_94A"] > 0.6 and 0 < m["test/ssim_94A"] <= 1
    figures = tmp_path / "runs" / "head" / "tracking" / "figures"  # no MLflow run: kept locally
    assert (figures / "reconstruction_test.png").exists()

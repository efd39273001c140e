"""StyleSwin's GAN objective: the losses of one step by hand on a toy GAN, the EMA and its
ramp against StyleGAN2-ADA's formula, settings, two Ray Train workers in lockstep, and a
short pretraining run whose checkpoint serves a finetuning head."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sdofm.config import ConfigError, load_config
from sdofm.engine import LoopConfig, StepInfo, fit
from sdofm.pretraining.objective import make_objective, scoring_objective
from sdofm.pretraining.styleswin import StyleSwinGAN, ema_beta
from tests.pretraining.test_pretrain import best_constant_guess

CHANNELS = load_config().data.channels
KWARGS = {"img_size": 32, "in_chans": 12, "num_frames": 1}
CPU = torch.device("cpu")


def gan(**settings) -> StyleSwinGAN:
    return StyleSwinGAN("styleswin_debug", KWARGS, CHANNELS, 0.05, (0.9, 0.95), 0, **settings)


# --------------------------------------------------------------------------------------------
# one step by hand


class ToyG(nn.Module):
    """z (B, 3) -> images (B, 1, 1, 2, 2), linear."""

    style_dim = 3

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.randn(3, 4))

    def forward(self, z):
        return (z @ self.A).reshape(-1, 1, 1, 2, 2)


class ToyD(nn.Module):
    """x (B, 1, 1, 2, 2) -> (B,) = sum(w * x^2): dD/dx = 2 w x, in closed form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 1, 2, 2))

    def forward(self, x):
        return (self.w * x.pow(2)).flatten(1).sum(1)


class ToyGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G, self.D = ToyG(), ToyD()


def softplus(t: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(t))


def test_one_step_losses_by_hand():
    """D: mean log(1 + e^-D(x)) + mean log(1 + e^D(G(z))); G: mean log(1 + e^-D(G(z)));
    R1 of D(x) = sum(w x^2): gamma / 2 * every * mean_b sum (2 w x_b)^2, whose gradient in w
    is 4 gamma every w mean_b x_b^2 (the penalty's graph reaches D's weights)."""
    torch.manual_seed(0)
    model = ToyGAN()
    objective = gan(r1_gamma=3.0, r1_every=4)
    real = torch.randn(5, 1, 1, 2, 2)
    batch = {"image": real}
    A, w = model.G.A.detach(), model.D.w.detach()

    def D(x):
        return (w * x.pow(2)).flatten(1).sum(1)

    info = StepInfo(step=0, epoch=0, total_steps=10)
    torch.manual_seed(7)
    loss_d = objective.loss(model, batch, info, "D", CPU)
    torch.manual_seed(7)
    fake = (torch.randn(5, 3) @ A).reshape(5, 1, 1, 2, 2)
    want = softplus(-D(real)).mean() + softplus(D(fake)).mean()
    torch.testing.assert_close(loss_d, want)

    torch.manual_seed(8)
    loss_g = objective.loss(model, batch, info, "G", CPU)
    torch.manual_seed(8)
    fake = (torch.randn(5, 3) @ A).reshape(5, 1, 1, 2, 2)
    torch.testing.assert_close(loss_g, softplus(-D(fake)).mean())
    loss_g.backward()
    assert model.G.A.grad is not None  # G learns through D

    model.D.w.grad = None
    loss_r1 = objective.loss(model, batch, info, "D_reg", CPU)
    penalty = (2 * w * real).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss_r1, 0.5 * 3.0 * 4 * penalty)
    loss_r1.backward()
    torch.testing.assert_close(model.D.w.grad, 4 * 3.0 * 4 * w * real.pow(2).mean(0))


def test_phases_optimisers_and_schedules():
    from sdofm.engine import Phase, Schedule

    objective = gan(r1_every=8, lr_d=1e-3, lr_g=2e-4, d_clip=2.0)
    assert objective.phases == (
        Phase("D", "D"),
        Phase("D_reg", "D", every=8),
        Phase("G", "G"),
    )
    model = objective.build_model()
    opts = objective.optimizers(model)
    assert set(opts) == {"D", "G"}
    for name, opt in opts.items():
        assert isinstance(opt, torch.optim.Adam)
        (group,) = opt.param_groups
        assert group["betas"] == (0.0, 0.99) and group["weight_decay"] == 0
        owned = {id(p) for p in group["params"]}
        assert owned == {id(p) for p in getattr(model, name).parameters()}
    default = Schedule(1.0, warmup_steps=5, total_steps=100, grad_clip=1.0)
    s = objective.schedules(default)
    assert s["D"] == Schedule(1e-3, grad_clip=2.0) and s["G"] == Schedule(2e-4)
    assert s["D"].lr_at(0) == 1e-3 and s["G"].lr_at(99) == 2e-4  # constant rates


def test_settings_come_from_model_objective_and_the_ema_clock_from_the_batch():
    overrides = [
        "model.name=styleswin_debug",
        "model.objective.r1_gamma=5",
        "model.objective.ema_rampup=null",
        "loader.batch_size=4",
        "scaling.num_workers=2",
        "train.grad_accum=3",
    ]
    objective = make_objective(load_config(None, overrides), (12, 1, 32, 32))
    assert isinstance(objective, StyleSwinGAN)
    assert objective.r1_gamma == 5 and objective.ema_rampup is None
    assert objective.batch_size == 4 * 2 * 3
    with pytest.raises(ConfigError, match="r1_gama.*valid keys: r1_gamma"):
        make_objective(
            load_config(None, ["model.name=styleswin_debug", "model.objective.r1_gama=5"]),
            (12, 1, 32, 32),
        )


def test_scoring_generates_from_g_ema_with_the_given_latents():
    objective = scoring_objective("styleswin", "styleswin_debug", KWARGS, CHANNELS, 0)
    assert objective.generates and not objective.reconstructs
    model = objective.build_model()
    with torch.no_grad():  # G and G_ema apart, so that the test tells which one draws
        for p in model.G.parameters():
            p.add_(0.1)
    frames = objective.generate(model, 40, torch.Generator().manual_seed(3))
    z = torch.randn(40, model.G.style_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(frames, model.G_ema(z))  # two batches of 32 and 8, same latents
        assert not torch.allclose(frames, model.G(z))
    assert frames.shape == (40, 12, 1, 32, 32)
    assert objective.seam_window(model) == 4


# --------------------------------------------------------------------------------------------
# EMA


def test_ema_beta_is_stylegan2_ada_half_life_with_its_ramp():
    kimg, ramp, batch = 10.0, 0.05, 32
    assert ema_beta(0, batch, kimg, ramp) == 0.0  # the first step copies G
    # 100 steps in: 3200 images seen, a half-life of 0.05 x 3200 = 160 images
    assert ema_beta(100, batch, kimg, ramp) == pytest.approx(0.5 ** (32 / 160))
    # past 200,000 images the half-life is 10 k images
    for step in (10_000, 50_000):
        assert ema_beta(step, batch, kimg, ramp) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(0, batch, kimg, None) == pytest.approx(0.5 ** (32 / 10_000))
    # a half-life in images: after 10,000 images (250 steps of 40) the old weights count half
    assert ema_beta(10**6, 40, kimg, None) ** 250 == pytest.approx(0.5)


def test_after_step_moves_g_ema_toward_g_by_the_formula():
    torch.manual_seed(0)
    objective = gan(ema_kimg=0.1, ema_rampup=0.05, batch_size=16)
    model = objective.build_model()
    with torch.no_grad():
        for p in model.G.parameters():
            p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in model.G_ema.state_dict().items()}
    step = 50  # 800 images seen: a half-life of min(100, 40) = 40 images
    beta = 0.5 ** (16 / 40)
    objective.after_step(model, StepInfo(step=step, epoch=0, total_steps=100))
    for k, v in model.G_ema.state_dict().items():
        want = beta * old[k] + (1 - beta) * model.G.state_dict()[k]
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6)
    assert not model.G_ema.const.requires_grad


# --------------------------------------------------------------------------------------------
# Ray Train: two workers


class Recording(StyleSwinGAN):
    """Writes each worker's whole state dict after every step."""

    def __init__(self, out: str, **settings):
        super().__init__("styleswin_debug", KWARGS, CHANNELS, 0.0, (0.9, 0.95), 0, **settings)
        self.out = out

    def after_step(self, model, info):
        import torch.distributed as dist

        super().after_step(model, info)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(model.state_dict(), Path(self.out, f"w_{rank}_{info.step}.pt"))


def random_frames(n: int):
    import ray.data

    rng = np.random.default_rng(0)
    return ray.data.from_items(
        [
            {
                "sample": i,
                "time": np.array([i], np.int64),
                "image": rng.normal(size=(12, 1, 32, 32)).astype(np.float32),
            }
            for i in range(n)
        ]
    )


@pytest.mark.usefixtures("ray_session")
def test_two_workers_keep_identical_g_d_and_ema(tmp_path):
    """Two Ray Train workers (gloo) train styleswin_debug with phases D, D_reg (steps 0 and
    2), G: after every step both hold bit-identical G, D, G_ema and spectral-norm vectors;
    G_ema follows G by the EMA formula; validation reports D's logits, both losses and R1
    summed over the workers, and rank 0 draws the samples figure."""
    out = tmp_path / "out"
    out.mkdir()
    batch, kimg = 8, 0.008  # a half-life of 8 images: beta 0.5 at every step (no ramp)
    objective = Recording(str(out), r1_every=2, ema_kimg=kimg, ema_rampup=None, batch_size=batch)
    loop = LoopConfig(
        epochs=2,
        schedule_steps=3,
        lr=1.0,  # unused: the objective schedules both optimisers itself
        max_steps=3,
        batch_size=batch // 2,
        splits=("train", "val"),
        val_every=None,
        checkpoint_every=None,
        fallback_dir=str(tmp_path / "tracking"),
    )
    scaling = SimpleNamespace(
        num_workers=2, use_gpu=False, cpus_per_worker=0.25, placement_strategy="PACK"
    )
    data = random_frames(16)
    result = fit("gan", str(tmp_path), objective, loop, {"train": data, "val": data}, scaling)
    assert result.metrics["step"] == 3
    for key in ("train/loss_D", "train/loss_G", "val/d_real", "val/d_fake", "val/r1"):
        assert math.isfinite(result.metrics[key]), key
    assert result.metrics["val/loss_D"] == result.metrics["val/loss"]

    torch.manual_seed(loop.seed)  # the workers' initial weights
    initial = objective.build_model().state_dict()
    beta = ema_beta(1, batch, kimg, None)
    assert beta == pytest.approx(0.5)
    previous_ema = {k: v for k, v in initial.items() if k.startswith("G_ema.")}
    for step in range(3):
        w0 = torch.load(out / f"w_0_{step}.pt")
        w1 = torch.load(out / f"w_1_{step}.pt")
        assert w0.keys() == w1.keys()
        for k in w0:
            assert torch.equal(w0[k], w1[k]), f"{k} differs between the workers after {step}"
        for k, old in previous_ema.items():
            g = w0["G." + k.removeprefix("G_ema.")]
            torch.testing.assert_close(w0[k], beta * old + (1 - beta) * g, rtol=0, atol=1e-6)
        previous_ema = {k: w0[k] for k in previous_ema}
    last = torch.load(out / "w_0_2.pt")
    for net in ("G.", "D."):
        moved = [k for k in last if k.startswith(net) and not torch.equal(last[k], initial[k])]
        assert moved, f"{net} did not train"
    assert list(Path(tmp_path, "tracking").rglob("samples/step_00000003.png"))


@pytest.mark.usefixtures("ray_session")
def test_a_resumed_run_continues_bit_for_bit(tmp_path):
    """Stopped at step 2 and resumed to 4, a run ends with the weights, spectral-norm vectors
    and G_ema of one that ran 4 steps straight: the checkpoint holds all the GAN's state.
    Every sample is the same frame, so that Ray Data's order plays no part."""
    import ray.data

    frame = np.random.default_rng(0).normal(size=(12, 1, 32, 32)).astype(np.float32)
    data = ray.data.from_items(
        [{"sample": i, "time": np.array([i], np.int64), "image": frame} for i in range(16)]
    )
    scaling = SimpleNamespace(
        num_workers=1, use_gpu=False, cpus_per_worker=0.5, placement_strategy="PACK"
    )

    def run(root: Path, steps: int) -> Path:
        out = root / "out"
        out.mkdir(parents=True, exist_ok=True)
        objective = Recording(str(out), r1_every=2, ema_kimg=0.008, batch_size=4)
        loop = LoopConfig(
            epochs=2,
            schedule_steps=4,
            lr=1.0,
            max_steps=steps,
            batch_size=4,
            val_every=None,
            checkpoint_every=2,
            fallback_dir=str(root / "tracking"),
        )
        fit("gan", str(root), objective, loop, {"train": data}, scaling)
        return out

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    a, b = torch.load(straight / "w_0_3.pt"), torch.load(resumed / "w_0_3.pt")
    assert a.keys() == b.keys() and any(k.endswith(".u") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# pretraining on the synthetic Sun, then a head


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.usefixtures("ray_session")
def test_pretrain_logs_both_losses_and_r1_and_serves_the_dimming_head(
    synth_root, cache_dir, tmp_path
):
    from mlflow import MlflowClient

    from sdofm.datasets.inputs import build_inputs
    from sdofm.finetuning.evaluate import evaluate, format_board
    from sdofm.finetuning.run import prepare, train_head
    from sdofm.finetuning.tasks import get_task
    from sdofm.generation import Calibrator, summarise
    from sdofm.models import get_model
    from sdofm.models.styleswin import StyleSwinEncoder
    from sdofm.pretraining import pretrain
    from tests.conftest import small_config

    def cfg(*extra):
        return small_config(
            synth_root,
            f"data.cache_dir={cache_dir}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "loader.readers=1",
            "loader.block_size=8",
            "loader.batch_size=8",
            "loader.shuffle_buffer=0",
            "scaling.cpus_per_worker=0.25",
            "tracking.system_metrics=false",
            *extra,
        )

    result = pretrain(
        cfg(
            "model.name=styleswin_debug",
            "model.objective.r1_every=2",
            "train.run_name=styleswin",
            "train.epochs=5",
            "train.max_steps=6",
            "train.log_every=2",
            "train.val_every=3",
            "train.checkpoint_every=6",
            "train.val_samples=16",
        )
    )
    assert result.metrics["step"] == 6
    client = MlflowClient(result.tracking_uri)

    def history(key):
        return [m.step for m in client.get_metric_history(result.run_id, key)]

    assert history("train/loss_D") == history("train/loss_G") == [2, 3, 4, 6]
    assert history("train/loss_D_reg") == [2, 3, 6]  # R1 at steps 0, 2, 4 (from 0)
    assert history("val/d_real") == history("val/r1") == [3, 6]
    # The generation scores of G_ema's samples at each validation (their calibration is
    # sdofm evaluate's, below).
    run = client.get_run(result.run_id)
    gen = {k: v for k, v in run.data.metrics.items() if k.startswith("val/gen/")}
    assert {"val/gen/fd/random_cnn", "val/gen/kid/physical", "val/gen/seams"} <= set(gen)
    assert all(math.isfinite(v) for v in gen.values()) and gen["val/gen/fd/physical"] > 0
    assert history("val/gen/fd/random_cnn") == [3, 6]
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.params["derived.parameters"]) == 126_131 + 56_897  # G and D
    params = run.data.params  # each optimiser's own learning rate, not train.lr's rule
    assert float(params["derived.peak_lr_D"]) == 2e-4 and float(params["derived.peak_lr_G"]) == 5e-5
    assert "derived.peak_lr" not in params
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert {"samples/step_00000003.png", "samples/step_00000006.png"} <= artifacts
    state = json.loads(
        (tmp_path / "runs" / "styleswin" / "checkpoint_00000006" / "state.json").read_text()
    )
    assert state["encoder_family"] == "styleswin"

    import mlflow.pytorch

    mlflow.set_tracking_uri(result.tracking_uri)
    encoder = mlflow.pytorch.load_model(result.model_uri)
    assert isinstance(encoder, StyleSwinEncoder)
    assert encoder.forward_features(torch.zeros(1, 12, 1, 32, 32)).shape == (1, 17, 32)

    head_cfg = cfg(
        f"finetune.backbone={result.checkpoint}",
        "finetune.head=conv",
        "finetune.epochs=1",
        "finetune.max_train_samples=32",
    )
    task = get_task("dimming")
    prepared = prepare(head_cfg, task)
    assert prepared.backbone.family == "styleswin"
    fitted = train_head(head_cfg, task, prepared, None, "styleswin_head", str(tmp_path / "runs"))
    assert fitted.metrics["epoch"] == 1
    assert fitted.metrics["test/mae"] < best_constant_guess(head_cfg, prepared)

    # sdofm evaluate: no reconstruction section, a generation section instead (one head
    # seed: the seeds' bootstrap is tested with the MAE's board).
    board = evaluate(
        head_cfg.model_copy(
            update={"finetune": head_cfg.finetune.model_copy(update={"head_seeds": 1})}
        ),
        ["dimming"],
        n_boot=50,
    )
    text = format_board(board)
    assert "reconstruction: not scored (a styleswin backbone reconstructs no input" in text
    assert "-- generation: G_ema's frames against" in text
    assert "no encoder space: no finished mae pretraining run" in text  # none in this store
    rows = {r["metric"]: r for r in board.generation.rows}
    assert "fd/random_cnn" in rows and "fd/encoder" not in rows
    logged = client.get_run(board.run_id).data.metrics
    assert logged["generation/pretrained/spectrum"] == rows["spectrum"]["pretrained"]
    assert logged["generation/floor/fd/physical"] == rows["fd/physical"]["floor"]
    # The section's generators, by hand: G_ema of the checkpoint and of a seeded random
    # model, latents from generation.seed, against the test frames read here.
    gc = head_cfg.generation
    pipe = build_inputs(
        head_cfg, transform=head_cfg.transform.model_copy(update={"on": "reader"})
    ).pipeline
    batches = list(pipe.dataset("test", epoch=0).iter_batches(batch_size=64))
    order = np.argsort(np.concatenate([b["sample"] for b in batches]))
    real = np.concatenate([b["image"][:, :, -1] for b in batches])[order]
    ckpt = torch.load(Path(result.checkpoint) / "model.pt", map_location="cpu")
    torch.manual_seed(head_cfg.train.seed)
    models = {"random_init": get_model("styleswin_debug", img_size=32, in_chans=12)}
    models["pretrained"] = get_model("styleswin_debug", img_size=32, in_chans=12)
    models["pretrained"].load_state_dict(ckpt)
    cal = Calibrator(summarise(real, CHANNELS), gc.splits, gc.seed, 4)
    reference = cal.calibrate({})
    for arm, model in models.items():
        with torch.no_grad():
            z = torch.randn(len(real), 32, generator=torch.Generator().manual_seed(gc.seed))
            frames = model.eval().G_ema(z)[:, :, -1].numpy()
        cal.add_arm(reference, arm, summarise(frames, CHANNELS))
        for m in ("value_w1", "spectrum", "fd/random_cnn", "fd/physical"):
            assert rows[m][arm] == pytest.approx(reference.arms[arm][m].mean(), rel=1e-6), (arm, m)
    for m in ("value_w1", "seams", "kid/physical"):
        assert rows[m]["floor"] == pytest.approx(reference.floor[m].mean(), rel=1e-9)

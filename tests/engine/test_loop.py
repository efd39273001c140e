"""The engine's loop on Ray Train with toy objectives whose answer is known in closed form
or from a plain single-process loop written out here."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sdofm.engine import Evaluation, LoopConfig, Objective, Phase, Schedule, fit
from sdofm.engine.checkpoint import OPTIMIZER_FILE, STATE_FILE

pytestmark = pytest.mark.usefixtures("ray_session")


def scaling(workers: int) -> SimpleNamespace:
    return SimpleNamespace(
        num_workers=workers, use_gpu=False, cpus_per_worker=0.25, placement_strategy="PACK"
    )


class TwoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([2.0]))
        self.b = nn.Parameter(torch.tensor([3.0]))


class TwoOptimisers(Objective):
    """Two phases: loss ``first`` = a * b steps ``a``; then loss ``second`` = a * b steps
    ``b``, seeing ``a`` as ``first`` left it. Were ``first``'s gradient to reach ``b``,
    or ``second`` to see the old ``a``, b would move by other amounts."""

    phases = (Phase("first", "first"), Phase("second", "second"))
    headline = ()

    def build_model(self):
        return TwoWeights()

    def optimizers(self, model):
        return {
            "first": torch.optim.SGD([model.a], lr=0.0),
            "second": torch.optim.SGD([model.b], lr=0.0),
        }

    def loss(self, model, batch, info, phase, device):
        return (model.a * model.b).sum()

    def evaluate(self, model, shard, split, ctx):
        return Evaluation({f"{split}/a": float(model.a), f"{split}/b": float(model.b)})

    def describe(self, batch):
        return "toy"


class ScaledSecond(TwoOptimisers):
    """``b``'s param group at half the schedule's lr (``lr_scale``)."""

    def optimizers(self, model):
        return {
            "first": torch.optim.SGD([model.a], lr=0.0),
            "second": torch.optim.SGD([{"params": [model.b], "lr_scale": 0.5}], lr=0.0),
        }


@pytest.mark.parametrize(("objective", "b_scale"), [(TwoOptimisers(), 1.0), (ScaledSecond(), 0.5)])
def test_each_phase_steps_its_own_optimiser_and_the_checkpoint_holds_both(
    tmp_path, objective, b_scale
):
    import ray.data

    data = ray.data.from_items([{"sample": i, "x": np.float32(i)} for i in range(4)])
    lr = 0.1
    loop = LoopConfig(
        epochs=1,
        schedule_steps=1,
        lr=lr,  # warm-up 0 and one step: the first step's lr is the peak
        max_steps=1,
        grad_clip=None,
        batch_size=4,
        splits=("train", "val"),
        fallback_dir=str(tmp_path / "tracking"),
    )
    result = fit("toy", str(tmp_path), objective, loop, {"train": data, "val": data}, scaling(1))
    a1 = 2.0 - lr * 3.0  # d(ab)/da = b
    assert result.metrics["step"] == 1
    assert result.metrics["val/a"] == pytest.approx(a1)
    assert result.metrics["val/b"] == pytest.approx(3.0 - b_scale * lr * a1)  # the updated a
    assert result.metrics["train/loss_first"] == pytest.approx(6.0)
    assert result.metrics["train/loss_second"] == pytest.approx(a1 * 3.0)
    state = json.loads((tmp_path / "toy" / "checkpoint_00000001" / STATE_FILE).read_text())
    assert (state["step"], state["epoch"]) == (1, 0)
    saved = torch.load(tmp_path / "toy" / "checkpoint_00000001" / OPTIMIZER_FILE)
    assert set(saved) == {"first", "second"}


# A GAN-shaped toy: a discriminator d and a generator g (3-vectors), an EMA copy of g.
D0, G0 = [0.5, -0.3, 0.2], [1.0, 0.8, -0.5]
LR_D, CLIP_D, LR_G, WARMUP_G, REG, REG_EVERY = 0.1, 0.5, 0.05, 2, 0.1, 2


def ema_beta(step: int) -> float:
    return step / (step + 2.0)  # a ramp: where the run is matters on resume


class Vec(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(v))


class ToyGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.D, self.G, self.G_ema = Vec(D0), Vec(G0), Vec(G0)
        self.G_ema.requires_grad_(False)


class ToyGANObjective(Objective):
    """D: mean (x.d - 1)^2 + mean ((x*g).d)^2; every other step a lazy penalty
    REG * |d|^2 (scaled by its interval); G: mean ((x*g).d - 1)^2; EMA of g after the step.
    Each worker writes the sample ids it trained on and its weights after every step."""

    phases = (Phase("D", "D"), Phase("D_reg", "D", every=REG_EVERY), Phase("G", "G"))
    headline = ()

    def __init__(self, out: str, only_g: bool = False):
        self.out = out
        if only_g:  # one phase: each micro-batch's backward runs as it arrives
            self.phases = (Phase("G", "G"),)

    def build_model(self):
        return ToyGAN()

    def optimizers(self, model):
        return {
            "D": torch.optim.SGD(model.D.parameters(), lr=0.0),
            "G": torch.optim.Adam(model.G.parameters(), lr=0.0, betas=(0.0, 0.99)),
        }

    def schedules(self, default):
        return {
            "D": Schedule(LR_D, grad_clip=CLIP_D),
            "G": Schedule(LR_G, warmup_steps=WARMUP_G),
        }

    @staticmethod
    def rank() -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0

    def loss(self, model, batch, info, phase, device):
        x, d, g = batch["x"].float(), model.D.w, model.G.w
        if phase == self.phases[0].name:
            path = Path(self.out, f"ids_{self.rank()}_{info.step}.jsonl")
            with path.open("a") as f:  # one line per micro-batch
                f.write(json.dumps(batch["sample"].tolist()) + "\n")
        if phase == "D":
            return ((x @ d - 1) ** 2).mean() + (((x * g) @ d) ** 2).mean()
        if phase == "D_reg":
            return REG_EVERY * REG * (d**2).sum()
        return (((x * g) @ d - 1) ** 2).mean()

    def after_step(self, model, info):
        beta = ema_beta(info.step)
        with torch.no_grad():
            model.G_ema.w.mul_(beta).add_(model.G.w, alpha=1 - beta)
        state = {k: v.tolist() for k, v in model.state_dict().items()}
        Path(self.out, f"w_{self.rank()}_{info.step}.json").write_text(json.dumps(state))

    def evaluate(self, model, shard, split, ctx):
        return Evaluation({})

    def describe(self, batch):
        return "toy"


def reference(
    xs: np.ndarray, batches: list[list[int]], stale_d: bool = False, only_g: bool = False
) -> list[dict]:
    """The toy GAN trained in one process on each step's global batch: D's step(s), then
    G's against the updated d (``stale_d``: against d as it was before D's step;
    ``only_g``: G's step alone)."""
    d = torch.tensor(D0, requires_grad=True)
    g = torch.tensor(G0, requires_grad=True)
    g_ema = torch.tensor(G0)
    adam = torch.optim.Adam([g], lr=0.0, betas=(0.0, 0.99))

    def sgd_clipped(loss):
        (grad,) = torch.autograd.grad(loss, d)
        norm = grad.norm()
        grad = grad * torch.clamp(CLIP_D / (norm + 1e-6), max=1.0)
        with torch.no_grad():
            d.sub_(LR_D * grad)

    out = []
    for step, ids in enumerate(batches):
        x = torch.tensor(xs[ids])
        d_before = d.detach().clone()
        if not only_g:
            sgd_clipped(((x @ d - 1) ** 2).mean() + (((x * g.detach()) @ d) ** 2).mean())
        if step % REG_EVERY == 0 and not only_g:
            sgd_clipped(REG_EVERY * REG * (d**2).sum())
        d_seen = d_before if stale_d else d.detach()
        adam.param_groups[0]["lr"] = LR_G * min(1.0, (step + 1) / WARMUP_G)
        adam.zero_grad()
        (((x * g) @ d_seen - 1) ** 2).mean().backward()
        adam.step()
        beta = ema_beta(step)
        g_ema = beta * g_ema + (1 - beta) * g.detach()
        out.append({"D.w": d.detach().clone(), "G.w": g.detach().clone(), "G_ema.w": g_ema})
    return out


def toy_data(n: int = 16):
    import ray.data

    xs = np.random.default_rng(3).normal(size=(n, 3)).astype(np.float32)
    return xs, ray.data.from_items([{"sample": i, "x": xs[i]} for i in range(n)])


def toy_loop(tmp_path: Path, max_steps: int, grad_accum: int = 1) -> LoopConfig:
    return LoopConfig(
        epochs=1,
        schedule_steps=4,
        lr=1.0,  # unused: the objective schedules both optimisers itself
        max_steps=max_steps,
        batch_size=2 // grad_accum,
        grad_accum=grad_accum,
        val_every=None,
        checkpoint_every=2,
        fallback_dir=str(tmp_path / "tracking"),
    )


def read_run(out: Path, steps: int, workers: int):
    """Per step: the global batch's ids, and each worker's weights after it."""

    def ids(rank: int, step: int) -> list[int]:
        lines = (out / f"ids_{rank}_{step}.jsonl").read_text().splitlines()
        return [i for line in lines for i in json.loads(line)]

    batches = [sorted(i for r in range(workers) for i in ids(r, s)) for s in range(steps)]
    weights = [
        [json.loads((out / f"w_{r}_{s}.json").read_text()) for r in range(workers)]
        for s in range(steps)
    ]
    return batches, weights


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_workers_train_phases_d_then_g_with_identical_weights_equal_to_one_process(
    tmp_path, grad_accum
):
    """Two Ray Train workers (gloo): after every step both hold bit-identical D, G and EMA
    weights, equal to one process trained on the same global batches, D before G (with
    two micro-batches per step too); an engine whose G phase saw the old D would be off
    by far more than the tolerance."""
    xs, data = toy_data()
    out = tmp_path / "out"
    out.mkdir()
    fit(
        "gan",
        str(tmp_path),
        ToyGANObjective(str(out)),
        toy_loop(tmp_path, 4, grad_accum),
        {"train": data},
        scaling(2),
    )
    batches, weights = read_run(out, 4, workers=2)
    assert all(len(b) == 4 and len(set(b)) == 4 for b in batches)  # 2 samples per worker
    ref, stale = reference(xs, batches), reference(xs, batches, stale_d=True)
    for step in range(4):
        rank0, rank1 = weights[step]
        assert rank0 == rank1, f"the workers' weights differ after step {step}"
        for key, want in ref[step].items():
            np.testing.assert_allclose(rank0[key], want.numpy(), rtol=0, atol=2e-6)
    off = max(
        np.abs(np.array(w[0]["G.w"]) - s["G.w"].numpy()).max()
        for w, s in zip(weights, stale, strict=True)
    )
    assert off > 1e-3


def test_a_resumed_phase_run_continues_as_the_uninterrupted_one(tmp_path):
    """Stopped after step 2 and resumed to step 4: the checkpoint brought back D, G, the EMA
    copy and Adam's moments, and the lazy penalty (every 2 steps) and the EMA ramp go on
    from step 2, so every step equals the one-process reference."""
    xs, data = toy_data()
    out = tmp_path / "out"
    out.mkdir()
    objective = ToyGANObjective(str(out))
    fit("gan", str(tmp_path), objective, toy_loop(tmp_path, 2), {"train": data}, scaling(2))
    state = json.loads((tmp_path / "gan" / "checkpoint_00000002" / STATE_FILE).read_text())
    assert state["step"] == 2
    saved = torch.load(tmp_path / "gan" / "checkpoint_00000002" / OPTIMIZER_FILE)
    assert set(saved) == {"D", "G"} and saved["G"]["state"]  # Adam's moments are there
    fit("gan", str(tmp_path), objective, toy_loop(tmp_path, 4), {"train": data}, scaling(2))
    batches, weights = read_run(out, 4, workers=2)
    ref = reference(xs, batches)
    for step in range(4):
        assert weights[step][0] == weights[step][1]
        for key, want in ref[step].items():
            np.testing.assert_allclose(weights[step][0][key], want.numpy(), rtol=0, atol=2e-6)


def test_one_phase_runs_each_micro_batch_as_it_arrives_and_matches_one_process(tmp_path):
    """A single phase with two micro-batches per step on two workers (the path MAE and
    NVAE take: no micro-batch held) equals the one-process reference."""
    xs, data = toy_data()
    out = tmp_path / "out"
    out.mkdir()
    objective = ToyGANObjective(str(out), only_g=True)
    fit("g", str(tmp_path), objective, toy_loop(tmp_path, 4, 2), {"train": data}, scaling(2))
    batches, weights = read_run(out, 4, workers=2)
    ref = reference(xs, batches, only_g=True)
    for step in range(4):
        assert weights[step][0] == weights[step][1]
        for key, want in ref[step].items():
            np.testing.assert_allclose(weights[step][0][key], want.numpy(), rtol=0, atol=2e-6)


class NaNAt(TwoOptimisers):
    """``first``'s loss is NaN at optimiser step ``step`` (from 0), finite before."""

    def __init__(self, step: int):
        self.step = step

    def loss(self, model, batch, info, phase, device):
        loss = super().loss(model, batch, info, phase, device)
        return loss * float("nan") if info.step == self.step and phase == "first" else loss


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_phase(tmp_path):
    import ray.data

    from sdofm.engine import RunFailedError

    data = ray.data.from_items([{"sample": i, "x": np.float32(i)} for i in range(8)])
    loop = LoopConfig(
        epochs=1,
        schedule_steps=4,
        lr=0.0,
        max_steps=4,
        batch_size=2,
        val_every=None,
        checkpoint_every=1,
        fallback_dir=str(tmp_path / "tracking"),
    )
    with pytest.raises(RunFailedError, match=r"non-finite first loss nan at step 2 \(epoch 0"):
        fit("nan", str(tmp_path), NaNAt(2), loop, {"train": data}, scaling(1))
    # Nothing trained on the NaN: the newest checkpoint is the step before it.
    assert sorted(p.name for p in (tmp_path / "nan").glob("checkpoint_0*")) == [
        "checkpoint_00000001",
        "checkpoint_00000002",
    ]


def test_two_workers_repeat_a_run_bit_for_bit(tmp_path):
    """The same seeded two-worker run twice: each worker trains on the same samples at
    every step (the plan's order, split the same way) and ends every step with the same
    weights, to the bit."""
    runs = []
    for k in range(2):
        xs, data = toy_data()
        out = tmp_path / f"out{k}"
        out.mkdir()
        fit(
            f"gan{k}",
            str(tmp_path),
            ToyGANObjective(str(out)),
            toy_loop(tmp_path, 4),
            {"train": data},
            scaling(2),
        )
        ids = [
            [(out / f"ids_{rank}_{step}.jsonl").read_text() for rank in range(2)]
            for step in range(4)
        ]
        runs.append((ids, read_run(out, 4, workers=2)[1]))
    (ids_a, weights_a), (ids_b, weights_b) = runs
    assert ids_a == ids_b  # per worker, per step
    assert weights_a == weights_b

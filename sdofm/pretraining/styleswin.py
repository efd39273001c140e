"""StyleSwin's GAN objective on the engine's phases (after StyleSwin's ``train_styleswin.py``
and StyleGAN2-ADA's training loop): the discriminator, its lazy R1 penalty, then the
generator, each stepping its own Adam; the EMA of the generator after every step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from sdofm.engine.objective import (
    EvalContext,
    Evaluation,
    Phase,
    Schedule,
    all_gather,
    all_reduce_sum,
)
from sdofm.engine.optim import autocast
from sdofm.generation import Summary, scores, summarise
from sdofm.generation.metrics import Standardiser
from sdofm.models.styleswin import d_logistic_loss, g_nonsaturating_loss, r1_penalty
from sdofm.pretraining.objective import BackboneObjective, draw_seed
from sdofm.pretraining.run import effective_batch
from sdofm.tracking import samples_figure

ADAM_BETAS = (0.0, 0.99)
"""StyleGAN2's and StyleSwin's Adam: no momentum, so that each network answers the other's
latest move rather than an average of its past ones."""
GENERATE_BATCH = 32
"""Frames the scoreboard draws from G_ema at once."""
FIGURE_SAMPLES, FIGURE_REALS = 4, 2
"""EMA-generator samples and real validation frames drawn side by side at each validation."""


def ema_beta(step: int, batch_size: int, ema_kimg: float, ema_rampup: float | None) -> float:
    """The EMA decay after optimiser step ``step`` (from 0) of ``batch_size`` images: a
    half-life of ``ema_kimg`` thousand images, shortened to ``ema_rampup`` times the images
    seen before the step while that is shorter (StyleGAN2-ADA), so that a short run's EMA
    does not stay near the random initial weights. Step 0 copies G (beta 0) under a ramp."""
    ema_nimg = ema_kimg * 1000.0
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, step * batch_size * ema_rampup)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


class StyleSwinGAN(BackboneObjective):
    """The non-saturating logistic GAN (Goodfellow et al. 2014; StyleGAN2's losses) with
    phases, in this order, at every optimiser step:

    * ``D``: mean softplus(-D(x)) + mean softplus(D(G(z))), x the real frames, z ~ N(0, I);
      D's gradient clipped to ``d_clip``.
    * ``D_reg`` (every ``r1_every`` steps): the R1 penalty gamma / 2 * E|dD(x)/dx|^2 on real
      frames, times ``r1_every`` to keep its weight (lazy regularisation), in float32 under
      bf16 autocast too (a gradient of a gradient).
    * ``G``: mean softplus(-D(G(z))), against the D just stepped.

    Then ``G_ema`` follows G (:func:`ema_beta`). Adam with betas (0, 0.99), no weight decay,
    constant learning rates ``lr_d`` and ``lr_g`` (StyleSwin's two time-scales: G at a
    quarter of D's); ``train.lr``, ``train.betas`` and ``train.weight_decay`` play no part.
    No colour or flip augmentation: the Sun's orientation and channel intensities are physical.

    Validation reports, on the val split, D's mean logit on real frames and on G's samples
    (``d_real``, ``d_fake``), both losses (``loss_D``, which is also ``loss``, and ``loss_G``)
    and the R1 penalty without its weight (``r1``); each sample's latent is drawn from the seed
    and its id, so validations compare across steps. The figure shows EMA samples beside real
    frames, channel by channel. With them, the generation scores (``sdofm.generation``:
    Frechet and kernel distances, precision and recall in the random-CNN and physical feature
    spaces, value distributions, power spectra) of G_ema's samples of the same latents
    against the real frames, as ``<split>/gen/<metric>``; their calibration against the
    noise floor and corruptions is ``sdofm evaluate``'s.
    """

    headline = ("val/loss_D", "val/loss_G", "val/d_real", "val/d_fake", "val/gen/fd/random_cnn")
    score_name = "generation"
    reconstructs = False
    generates = True

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        r1_gamma: float = Field(10.0, ge=0)
        """Weight gamma of the R1 penalty gamma / 2 * E|grad D(x)|^2 (StyleSwin: 10, or 5 on
        CelebA-HQ and LSUN Church)."""
        r1_every: int = Field(16, ge=1)
        """Steps between R1 phases (lazy regularisation); the penalty is scaled by it."""
        lr_d: float = Field(2e-4, gt=0)
        """Learning rate of the discriminator's Adam."""
        lr_g: float = Field(5e-5, gt=0)
        """Learning rate of the generator's Adam (StyleSwin's TTUR: a quarter of lr_d)."""
        d_clip: float | None = Field(5.0, gt=0)
        """Clip of the discriminator's gradient norm, in its loss and R1 phases alike
        (StyleSwin clips at 5); None: no clip."""
        ema_kimg: float = Field(10.0, gt=0)
        """Half-life of G_ema in thousands of images (StyleSwin: 10)."""
        ema_rampup: float | None = Field(0.05, gt=0)
        """While ``ema_rampup`` times the images seen is shorter, that is the half-life
        (StyleGAN2-ADA's ramp); None: ``ema_kimg`` from the first step."""

    def __init__(
        self,
        model_name: str,
        kwargs: dict[str, Any],
        channels: list[str],
        weight_decay: float,
        betas: tuple[float, float],
        seed: int,
        r1_gamma: float = 10.0,
        r1_every: int = 16,
        lr_d: float = 2e-4,
        lr_g: float = 5e-5,
        d_clip: float | None = 5.0,
        ema_kimg: float = 10.0,
        ema_rampup: float | None = 0.05,
        batch_size: int = 1,
    ):
        super().__init__(model_name, kwargs, channels, weight_decay, betas, seed)
        self.r1_gamma, self.r1_every = r1_gamma, r1_every
        self.lr_d, self.lr_g, self.d_clip = lr_d, lr_g, d_clip
        self.ema_kimg, self.ema_rampup = ema_kimg, ema_rampup
        self.batch_size = batch_size
        """Images per optimiser step over every worker (the EMA's clock)."""
        self.phases = (Phase("D", "D"), Phase("D_reg", "D", every=r1_every), Phase("G", "G"))

    @classmethod
    def from_config(cls, cfg, kwargs: dict[str, Any]) -> StyleSwinGAN:

        tc = cfg.train
        common = (cfg.model.name, kwargs, cfg.data.channels, tc.weight_decay, tc.betas, tc.seed)
        settings = cls.settings(cfg.model.objective).model_dump()
        return cls(*common, **settings, batch_size=effective_batch(cfg))

    def optimizers(self, model) -> dict[str, torch.optim.Optimizer]:
        return {
            "D": torch.optim.Adam(model.D.parameters(), lr=self.lr_d, betas=ADAM_BETAS),
            "G": torch.optim.Adam(model.G.parameters(), lr=self.lr_g, betas=ADAM_BETAS),
        }

    def schedules(self, default: Schedule) -> dict[str, Schedule]:
        return {"D": Schedule(self.lr_d, grad_clip=self.d_clip), "G": Schedule(self.lr_g)}

    def loss(self, model, batch, info, phase: str, device) -> torch.Tensor:
        real = self.train_inputs(batch, device)
        if phase == "D_reg":
            with torch.autocast(device.type, enabled=False):
                real = real.detach().requires_grad_(True)
                penalty = r1_penalty(model.D(real), real)
            return 0.5 * self.r1_gamma * self.r1_every * penalty
        z = torch.randn(len(real), model.G.style_dim, device=device)
        if phase == "D":
            with torch.no_grad():  # G is a constant here: keep no graph of it
                fake = model.G(z)
            return d_logistic_loss(model.D(real), model.D(fake))
        if phase == "G":
            return g_nonsaturating_loss(model.D(model.G(z)))
        raise ValueError(f"StyleSwinGAN has no phase {phase!r}")

    def after_step(self, model, info) -> None:
        model.update_ema(ema_beta(info.step, self.batch_size, self.ema_kimg, self.ema_rampup))

    def fixed_latents(self, model, ids) -> torch.Tensor:
        """ids: (B,) sample ids -> z (B, style_dim): each drawn from the seed and its id alone,
        whatever batch or worker it falls in."""
        zs = []
        for i in np.asarray(ids).tolist():
            g = torch.Generator().manual_seed(draw_seed(self.seed, int(i)))
            zs.append(torch.randn(1, model.G.style_dim, generator=g))
        return torch.cat(zs)

    @torch.no_grad()
    def generate(self, model, n: int, generator: torch.Generator) -> torch.Tensor:
        """-> (n, C, T, H, W) frames of G_ema, in batches of ``GENERATE_BATCH``."""
        model.eval()
        parts = [
            model.sample(min(GENERATE_BATCH, n - i), generator) for i in range(0, n, GENERATE_BATCH)
        ]
        return torch.cat(parts).float()

    def seam_window(self, model) -> int:
        return model.window_size

    @torch.no_grad()
    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        """D's logits and both losses on real ``split`` frames and G's samples of fixed
        latents, the R1 penalty, summed over every worker; EMA samples beside real frames."""
        model.eval()  # spectral norms keep their power-iteration state
        sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)
        reals: list[np.ndarray] = []
        frames: dict[str, list[Summary]] = {"real": [], "fake": []}
        for batch in shard.iter_torch_batches(
            batch_size=ctx.batch_size, prefetch_batches=ctx.prefetch_batches
        ):
            x = batch["image"].to(ctx.device).float()
            z = self.fixed_latents(model, batch["sample"].cpu()).to(ctx.device)
            with autocast(ctx.device, ctx.precision):
                d_real = model.D(x).float()
                d_fake = model.D(model.G(z)).float()
            with torch.enable_grad(), torch.autocast(ctx.device.type, enabled=False):
                xr = x.detach().requires_grad_(True)
                logits = model.D(xr)
                (grad,) = torch.autograd.grad(logits.sum(), xr)
            soft_real = torch.nn.functional.softplus(-d_real)
            sums += torch.stack(
                [
                    torch.tensor(float(len(x)), device=ctx.device),
                    d_real.sum(),
                    d_fake.sum(),
                    soft_real.sum() + torch.nn.functional.softplus(d_fake).sum(),
                    torch.nn.functional.softplus(-d_fake).sum(),
                    grad.pow(2).flatten(1).sum(1).sum(),
                ]
            ).double()
            if ctx.figures and len(reals) < FIGURE_REALS:
                reals += [f[:, -1].cpu().numpy() for f in x[: FIGURE_REALS - len(reals)]]
            with autocast(ctx.device, ctx.precision):
                ema = model.G_ema(z)
            for key, f in (("real", x), ("fake", ema)):  # summaries, not frames, are kept
                frames[key].append(summarise(f[:, :, -1].float().cpu().numpy(), self.channels))
        all_reduce_sum(sums)
        n = max(float(sums[0]), 1.0)
        d_real, d_fake, loss_d, loss_g, r1 = (float(v) / n for v in sums[1:])
        metrics = {
            f"{split}/d_real": d_real,
            f"{split}/d_fake": d_fake,
            f"{split}/loss_D": loss_d,
            f"{split}/loss_G": loss_g,
            f"{split}/loss": loss_d,
            f"{split}/r1": r1,
        }
        real, fake = (self._gathered(frames[k], model) for k in ("real", "fake"))
        if len(real) >= 2:
            gen = scores(real, fake, Standardiser(real), self.seam_window(model))
            metrics.update({f"{split}/gen/{k}": v for k, v in gen.items()})
        figures = [self._figure(model, reals, ctx)] if ctx.figures and reals else []
        model.train()
        return Evaluation(metrics, figures)

    def _gathered(self, parts: list[Summary], model) -> Summary:
        """This worker's batch summaries -> the Summary of every worker's frames (in rank
        order)."""
        if not parts:  # a worker with no frames of the split still joins the gather
            parts = [summarise(np.zeros((0, len(self.channels), *model.img_size)), self.channels)]
        s = Summary.concat(parts)
        spaces = list(s.features)
        *feats, hist, spectrum = all_gather((*(s.features[k] for k in spaces), s.hist, s.spectrum))
        return Summary(dict(zip(spaces, feats, strict=True)), hist, spectrum, s.channels)

    def _figure(self, model, reals: list[np.ndarray], ctx: EvalContext) -> tuple[str, Any]:
        """Real frames, then G_ema's samples of fixed latents, one row per channel."""
        g = torch.Generator().manual_seed(self.seed + 54321)
        with autocast(ctx.device, ctx.precision):
            fake = model.sample(FIGURE_SAMPLES, generator=g).float()[:, :, -1].cpu().numpy()
        images = np.concatenate([np.stack(reals), fake])
        title = (
            f"step {ctx.step} | {len(reals)} real val frames, then "
            f"{FIGURE_SAMPLES} samples of G_ema"
        )
        return f"samples/step_{ctx.step:08d}.png", samples_figure(images, self.channels, title)

"""Pretraining objectives: the MAE's masked reconstruction and a hierarchical VAE's ELBO."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from sdofm.config import ConfigError, ModelConfig
from sdofm.datasets.blocks import make_preprocessor
from sdofm.datasets.transforms import _zscore_params
from sdofm.engine.objective import EvalContext, Evaluation, Objective, all_reduce_sum
from sdofm.engine.optim import autocast, param_groups
from sdofm.models import FAMILIES, family_of, get_model, resolve
from sdofm.models.nvae import active_units_from_moments, kl_warmup_weight
from sdofm.tracking import reconstruction_figure, samples_figure


def model_kwargs(model: ModelConfig, channels: list[str], sample_shape: tuple) -> dict[str, Any]:
    """Constructor arguments of the backbone for images of ``sample_shape`` = (C, T, H, W).

    Image size, channels and frames follow the data; set in ``model.overrides`` they must
    agree with it.
    """
    C, T, H, _ = sample_shape
    from_data = {"img_size": H, "in_chans": C, "num_frames": T}
    for key, value in from_data.items():
        given = model.overrides.get(key)
        if given is not None and given != value:
            raise ConfigError(
                f"model.overrides.{key} = {given} but the data give {value} "
                f"({C} channels {channels}, {T} frames, {H} px); "
                f"remove the override or change the data config"
            )
    return {**from_data, **model.overrides}


def draw_seed(seed: int, sample: int) -> int:
    """A 32-bit seed for the random draws of scoring ``sample`` (torch's CPU generator keeps
    only 32 bits of a seed, so the two are hashed rather than packed into 64)."""
    return int(np.random.SeedSequence([seed, 12345, sample]).generate_state(1)[0])


class DimmingJitter:
    """Pretraining augmentation: AIA channel c of each sample dimmed by alpha ~ U[alpha_min, 1]
    in physical units, as :func:`sdofm.datasets.transforms.dim` does before scaling, applied
    to the already log-scaled, z-scored model input as its exact equivalent

        y -> max(y + log10(alpha) / std_c, (log10(clip_min_c) - mean_c) / std_c)

    (log10 of the clipped, dimmed value; a pixel clipped at ``clip_max`` is taken as lying
    at it). Each sample is dimmed with probability ``prob`` (all its AIA channels, each by
    its own factor); the others pass unchanged. Factors come from torch's global generator,
    which the training loop seeds per step: a resumed run draws what an uninterrupted one
    would have.
    """

    def __init__(
        self,
        index: list[int],
        inv_std: list[float],
        floor: list[float],
        alpha_min: float,
        prob: float = 1.0,
    ):
        self.index, self.inv_std, self.floor = list(index), list(inv_std), list(floor)
        self.alpha_min, self.prob = float(alpha_min), float(prob)

    @classmethod
    def from_preprocessor(
        cls, pre, aia_channels, alpha_min: float, prob: float = 1.0
    ) -> DimmingJitter:
        """For the log-scaled AIA channels of ``pre`` (a Preprocessor); an error if none is."""

        n = len(pre.channels)
        plan = pre._plan(n)
        mean, std = (
            _zscore_params(pre.mean, pre.std, n)
            if pre.mean is not None
            else (np.zeros(n, np.float32), np.ones(n, np.float32))
        )
        index, inv_std, floor = [], [], []
        for c, name in enumerate(pre.channels):
            if name not in aia_channels:
                continue
            method, lo, _, _ = plan[c]
            if method != "log":
                raise ConfigError(
                    f"train.augment_dim_min dims AIA channels in log scaling; {name} is "
                    f"scaled with {method!r} (transform.scaling)"
                )
            index.append(c)
            inv_std.append(1.0 / float(std[c]))
            floor.append((float(np.log10(lo)) - float(mean[c])) / float(std[c]))
        if not index:
            raise ConfigError(
                "train.augment_dim_min needs AIA channels: data.aia_channels is empty"
            )
        return cls(index, inv_std, floor, alpha_min, prob)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, ...) model inputs -> a dimmed copy (factors from torch's generator)."""
        B, k, rest = x.shape[0], len(self.index), (1,) * (x.ndim - 2)
        alpha = torch.rand(B, k) * (1.0 - self.alpha_min) + self.alpha_min
        shift = torch.log10(alpha) * torch.tensor(self.inv_std)
        floor = torch.tensor(self.floor, dtype=x.dtype, device=x.device).reshape(1, k, *rest)
        dimmed = torch.maximum(
            x[:, self.index] + shift.to(x.device, x.dtype).reshape(B, k, *rest), floor
        )
        if self.prob < 1.0:  # the undimmed samples keep their inputs bit for bit
            chosen = (torch.rand(B) < self.prob).to(x.device).reshape(B, 1, *rest)
            dimmed = torch.where(chosen, dimmed, x[:, self.index])
        y = x.clone()
        y[:, self.index] = dimmed
        return y


class NoSettings(BaseModel):
    """An objective with no settings of its own (``model.objective`` must be empty)."""

    model_config = ConfigDict(extra="forbid")


class BackboneObjective(Objective):
    """What every pretraining objective shares: a registered model built with ``kwargs``,
    and AdamW without decay on norms, biases and tokens.

    A family's objective is named in its ``sdofm.models.FAMILIES`` row; ``from_config``
    builds it for training, ``for_scoring`` for the scoreboard."""

    Settings: type[BaseModel] = NoSettings
    """The objective's own settings, read from ``model.objective``."""
    reconstructs: bool = True
    """Whether :meth:`sample_errors` scores a per-sample reconstruction (a GAN's does not:
    the scoreboard leaves its reconstruction section out, saying why)."""
    generates: bool = False
    """Whether :meth:`generate` draws new frames (the scoreboard's generation section)."""
    forecasts: bool = False
    """Whether the model forecasts frames ahead (the scoreboard's forecast section)."""

    def __init__(
        self,
        model_name: str,
        kwargs: dict[str, Any],
        channels: list[str],
        weight_decay: float,
        betas: tuple[float, float],
        seed: int,
    ):
        self.model_name, self.kwargs, self.channels = model_name, kwargs, list(channels)
        self.weight_decay, self.betas, self.seed = weight_decay, tuple(betas), seed
        self.augment: DimmingJitter | None = None
        """Applied to training inputs only (``train.augment_dim_min``)."""
        self.dim_target = "dimmed"
        """What reconstructions of dimmed inputs are scored against
        (``train.augment_dim_target``)."""

    @classmethod
    def settings(cls, given: dict) -> BaseModel:
        """``model.objective`` checked against :attr:`Settings` (a clear error naming a
        misspelt or unknown key)."""
        try:
            return cls.Settings(**given)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            valid = ", ".join(cls.Settings.model_fields) or "none"
            raise ConfigError(
                f"model.objective.{key} = {err.get('input')!r}: {err['msg']} "
                f"({cls.__name__}; valid keys: {valid})"
            ) from None

    @classmethod
    def from_config(cls, cfg, kwargs: dict[str, Any]) -> BackboneObjective:
        """The objective of a pretraining run of ``cfg`` (model built with ``kwargs``)."""
        tc = cfg.train
        common = (cfg.model.name, kwargs, cfg.data.channels, tc.weight_decay, tc.betas, tc.seed)
        return cls(*common, **cls.settings(cfg.model.objective).model_dump())

    @classmethod
    def for_scoring(
        cls, model_name: str, kwargs: dict, channels: list[str], seed: int
    ) -> BackboneObjective:
        """The objective of a recorded backbone, to score its reconstructions: the training
        settings play no part there."""
        return cls(model_name, kwargs, channels, 0.0, (0.9, 0.95), seed)

    def train_inputs(self, batch, device) -> torch.Tensor:
        """The batch's images on ``device`` as float32, augmented when configured."""
        x = self.clean_inputs(batch, device)
        return x if self.augment is None else self.augment(x)

    def clean_inputs(self, batch, device) -> torch.Tensor:
        """The batch's images on ``device`` as float32, as observed."""
        return batch["image"].to(device, non_blocking=True).float()

    restores: bool = False
    """Whether the objective can reconstruct the undimmed sample from a dimmed one
    (``train.augment_dim_target`` "observed" or "both")."""

    def build_model(self) -> nn.Module:
        return get_model(self.model_name, **self.kwargs)

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        groups = param_groups(model, self.weight_decay)
        return {"model": torch.optim.AdamW(groups, betas=self.betas)}

    score_name: str = "error"
    """What :meth:`sample_errors` measures (the scoreboard's metric names)."""

    def sample_errors(self, model, imgs: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs: (B, C, T, H, W), ids: (B,) sample ids -> (B, C) sums, (B,) weights: the
        reconstruction term of each sample and channel, summed over what it averages (a
        channel's error over samples is ``sums.sum(0) / weights.sum()``). Its random draws
        depend on the seed and the sample ids only, so two models of one architecture are
        scored on the same draws (a paired comparison)."""
        raise NotImplementedError

    def generate(self, model, n: int, generator: torch.Generator) -> torch.Tensor:
        """-> (n, C, T, H, W) new frames of the trained model, its latents drawn from
        ``generator`` (objectives with ``generates``)."""
        raise NotImplementedError(f"{type(self).__name__} generates no frames")

    def seam_window(self, model) -> int:
        """The period, px, at which the generator's frames could show seams (its attention
        window), which the power-spectrum check watches."""
        raise NotImplementedError(f"{type(self).__name__} generates no frames")

    def checkpoint_meta(self, model: nn.Module) -> dict:
        """The encoder's and the whole model's constructor arguments, and the channels."""
        return {
            "encoder_config": model.encoder_config,
            "encoder_family": family_of(self.model_name),
            "model_name": self.model_name,
            "model_config": self.kwargs,
            "channels": self.channels,
        }


class MaskedReconstruction(BackboneObjective):
    """Masked autoencoding (He et al. 2022): the model returns its own loss on the masked
    patches; validation reports that loss per channel on fixed masks and draws
    reconstructions (input, masked, reconstruction, |error|)."""

    headline = ("val/loss",)
    score_name = "masked_mse"

    restores = True

    def loss(self, model, batch, info, optimizer, device) -> torch.Tensor:
        if self.dim_target == "dimmed":
            return model(self.train_inputs(batch, device))["loss"]
        x = self.clean_inputs(batch, device)
        if self.dim_target == "observed":
            return model(self.augment(x), target=x)["loss"]
        return model(self.augment(x), restored=x)["loss"]

    def fixed_masks(self, model, ids) -> torch.Tensor:
        """ids: (B,) sample ids -> ids_shuffle (B, L): each sample's mask drawn from the seed
        and its id alone, whatever batch or worker it falls in."""
        noise = []
        for i in np.asarray(ids).tolist():
            g = torch.Generator().manual_seed(draw_seed(self.seed, int(i)))
            noise.append(model.masking_noise(1, generator=g))
        return torch.argsort(torch.cat(noise), dim=1)

    def masked_forward(self, model, imgs: torch.Tensor, ids) -> dict[str, torch.Tensor]:
        """The model's output on ``imgs`` (B, C, T, H, W) under :meth:`fixed_masks`."""
        return model(imgs, ids_shuffle=self.fixed_masks(model, ids).to(imgs.device))

    @torch.no_grad()
    def sample_errors(self, model, imgs: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared error on the masked patches per sample and channel, under fixed masks."""
        out = self.masked_forward(model, imgs, ids)
        return model.channel_errors(imgs, out["pred"].float(), out["mask"])

    @torch.no_grad()
    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        """Masked loss per channel over this worker's shard, summed over every worker. Each
        sample's mask is fixed (:meth:`fixed_masks`), so validations are comparable across
        steps and worker counts."""
        model.eval()
        sums = torch.zeros(len(self.channels), dtype=torch.float64, device=ctx.device)
        weight = torch.zeros((), dtype=torch.float64, device=ctx.device)
        samples = []
        for batch in shard.iter_torch_batches(
            batch_size=ctx.batch_size, prefetch_batches=ctx.prefetch_batches
        ):
            imgs = batch["image"].to(ctx.device).float()
            with autocast(ctx.device, ctx.precision):
                out = self.masked_forward(model, imgs, batch["sample"].cpu())
            s, w = model.channel_errors(imgs, out["pred"].float(), out["mask"])
            sums += s.sum(0).double()
            weight += w.sum().double()
            if len(samples) < ctx.figures:
                masked, recon = model.reconstruct(imgs, out["pred"].float(), out["mask"])
                for i in range(min(ctx.figures - len(samples), len(imgs))):
                    images = tuple(x[i, :, -1].cpu().numpy() for x in (imgs, masked, recon))
                    samples.append((*images, int(batch["time"][i, -1])))
        model.train()
        all_reduce_sum(sums)
        all_reduce_sum(weight)
        losses = (sums / weight.clamp_min(1e-12)).float().cpu()
        metrics = {
            f"{split}/loss_{c}": float(v) for c, v in zip(self.channels, losses, strict=True)
        }
        metrics[f"{split}/loss"] = float(losses.mean())
        return Evaluation(metrics, [self._figure(s, i, ctx.step) for i, s in enumerate(samples)])

    def _figure(self, sample: tuple, i: int, step: int) -> tuple[str, Any]:
        image, masked, recon, t = sample
        when = np.datetime64(t, "ns").astype("datetime64[s]")
        title = f"step {step} | val sample {i} | {when}"
        fig = reconstruction_figure(image, masked, recon, self.channels, title=title)
        return f"reconstructions/step_{step:08d}_{i}.png", fig

    def tokens_per_sample(self, model: nn.Module) -> int:
        return model.num_patches


ACTIVE_UNIT_THRESHOLD = 0.01
"""A latent unit (one latent variable: a channel at a position) is active when its posterior
mean varies across samples by more than this (variance, Burda et al. 2016)."""


class ELBO(BackboneObjective):
    """A hierarchical VAE's objective (NVAE): the negative ELBO in nats per input dimension,
    with the KL weight warmed up linearly over the first ``kl_warmup`` share of the steps
    (KL-balanced by the model meanwhile), ``free_bits`` nats per latent variable of each
    group free of cost, and a spectral regulariser. Validation reports the
    ELBO, its reconstruction term, the KL and the number of active latent units per group,
    reconstructions and samples from the prior.

    bf16 autocast covers the convolutions; the likelihood and KL are computed in float32
    by the model (their log-scales and squared differences lose too much in bf16).
    """

    headline = ("val/elbo", "val/recon")
    score_name = "recon_nll"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        kl_warmup: float = Field(0.3, ge=0, le=1)
        """Share of the run's steps over which the KL weight rises from 0 to 1."""
        free_bits: float = Field(0.05, ge=0)
        """Nats per latent variable that each group's KL may hold without cost (free bits,
        Kingma et al. 2016), so that no group collapses; 0 trains the plain ELBO."""
        spectral_weight: float = Field(1e-4, ge=0)
        """Weight of the spectral regulariser (sum of the convolutions' largest singular
        values) against the loss in nats per input dimension."""

    def __init__(
        self,
        model_name: str,
        kwargs: dict[str, Any],
        channels: list[str],
        weight_decay: float,
        betas: tuple[float, float],
        seed: int,
        kl_warmup: float = 0.0,
        spectral_weight: float = 0.0,
        free_bits: float = 0.0,
    ):
        super().__init__(model_name, kwargs, channels, weight_decay, betas, seed)
        self.kl_warmup, self.spectral_weight = kl_warmup, spectral_weight
        self.free_bits = free_bits

    def loss(self, model, batch, info, optimizer, device) -> torch.Tensor:

        x = self.train_inputs(batch, device)
        weight = kl_warmup_weight(info.step, info.total_steps, self.kl_warmup)
        out = model(x, kl_weight=weight, free_bits=self.free_bits)
        core = getattr(model, "module", model)
        return out["loss"] + self.spectral_weight * core.spectral_loss()

    @torch.no_grad()
    def sample_errors(self, model, imgs: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction term (Gaussian NLL, nats per dimension) per sample and channel;
        the posterior draws are seeded from the seed and the batch's first id."""
        devices = [imgs.device] if imgs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(draw_seed(self.seed, int(np.asarray(ids)[0])))
            err = model(imgs, kl_weight=1.0)["recon_channels"].float()
        return err, torch.ones(len(err), device=err.device)

    @torch.no_grad()
    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        """ELBO terms summed over every worker's shard; active units from the variance of
        the posterior means over all of them."""

        model.eval()
        n = torch.zeros((), dtype=torch.float64, device=ctx.device)
        recon = torch.zeros((), dtype=torch.float64, device=ctx.device)
        kl = torch.zeros(model.num_latent_groups, dtype=torch.float64, device=ctx.device)
        first = sq = None
        example = None
        for batch in shard.iter_torch_batches(
            batch_size=ctx.batch_size, prefetch_batches=ctx.prefetch_batches
        ):
            x = batch["image"].to(ctx.device).float()
            with autocast(ctx.device, ctx.precision):
                out = model(x, kl_weight=1.0)
                means = model.posterior_means(x)
            b = len(x)
            n += b
            recon += float(out["recon"]) * b
            kl += out["kl"].double() * b
            m = [mu.double() for mu in means]  # (B, Cz, h, w) per group
            s = [mu.sum(0) for mu in m]
            s2 = [(mu * mu).sum(0) for mu in m]
            first = s if first is None else [a + c for a, c in zip(first, s, strict=True)]
            sq = s2 if sq is None else [a + c for a, c in zip(sq, s2, strict=True)]
            if example is None and ctx.figures:
                example = (x[0, :, -1].cpu().numpy(), out["x_hat"][0, :, -1].float().cpu().numpy())
        for t in (n, recon, kl, *(first or []), *(sq or [])):
            all_reduce_sum(t)
        count = max(float(n), 1.0)
        recon, kl = recon / count, kl / count
        metrics = {
            f"{split}/recon": float(recon),
            f"{split}/kl": float(kl.sum()),
            f"{split}/elbo": float(-(recon + kl.sum())),
        }
        metrics[f"{split}/loss"] = -metrics[f"{split}/elbo"]
        for g, v in enumerate(kl.tolist()):
            metrics[f"{split}/kl_g{g}"] = v
        if first is not None:
            units = active_units_from_moments(first, sq, count, ACTIVE_UNIT_THRESHOLD)
            for g, u in enumerate(units.tolist()):
                metrics[f"{split}/active_units_g{g}"] = float(u)
        figures = []
        if example is not None:
            figures.append(self._figures(model, example, ctx))
            figures.append(self._prior_figure(model, ctx))
        model.train()
        return Evaluation(metrics, figures)

    def _figures(self, model, example, ctx: EvalContext) -> tuple[str, Any]:
        image, recon = example
        title = f"step {ctx.step} | val sample 0 | reconstruction"
        fig = reconstruction_figure(image, None, recon, self.channels, title=title)
        return f"reconstructions/step_{ctx.step:08d}_0.png", fig

    def _prior_figure(self, model, ctx: EvalContext) -> tuple[str, Any]:
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(self.seed + 54321)
            samples = model.sample(4).float()[:, :, -1].cpu().numpy()
        title = f"step {ctx.step} | samples from the prior"
        return f"samples/step_{ctx.step:08d}.png", samples_figure(samples, self.channels, title)


def objective_class(family: str) -> type[BackboneObjective]:
    """The pretraining objective of ``family`` (its ``FAMILIES`` row)."""
    return resolve(FAMILIES[family].objective)


def scoring_objective(
    family: str, model_name: str, kwargs: dict, channels: list[str], seed: int
) -> BackboneObjective:
    """The pretraining objective of a recorded backbone (``model_name`` built with
    ``kwargs``), to score its reconstructions."""
    return objective_class(family).for_scoring(model_name, kwargs, channels, seed)


def make_objective(cfg, sample_shape: tuple, stats: dict | None = None) -> Objective:
    """The pretraining objective of ``cfg.model``'s family. ``stats``: the normalisation
    statistics, which the dimming augmentation (``train.augment_dim_min``) needs; without
    them (scoring only) it is off."""
    d, tc, mc = cfg.data, cfg.train, cfg.model
    kwargs = model_kwargs(mc, d.channels, sample_shape)
    objective = objective_class(family_of(mc.name)).from_config(cfg, kwargs)
    if tc.augment_dim_min is not None and (stats is not None or not cfg.transform.zscore):
        pre = make_preprocessor(d.channels, cfg.transform, sample_shape[-1], stats)
        objective.augment = DimmingJitter.from_preprocessor(
            pre, d.aia_channels, tc.augment_dim_min, tc.augment_dim_prob
        )
        if tc.augment_dim_target != "dimmed" and not objective.restores:
            raise ConfigError(
                f"train.augment_dim_target={tc.augment_dim_target!r}: "
                f"{family_of(mc.name)} backbones ({type(objective).__name__}) reconstruct "
                'no undimmed sample; only masked reconstruction (mae) does: use "dimmed"'
            )
        objective.dim_target = tc.augment_dim_target
        if tc.augment_dim_target == "both":  # the model's second head, recorded with it
            objective.kwargs = {**objective.kwargs, "restore_head": True}
    return objective

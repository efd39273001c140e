"""The MAE objective: the loss of the masked patches, validated per channel with figures."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from sdofm.config import ConfigError, ModelConfig
from sdofm.engine.objective import EvalContext, Evaluation, Objective, all_reduce_sum
from sdofm.engine.optim import autocast, param_groups
from sdofm.models import get_model


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


class MaskedReconstruction(Objective):
    """Masked autoencoding (He et al. 2022): the model returns its own loss on the masked
    patches; validation reports that loss per channel on fixed masks and draws
    reconstructions (input, masked, reconstruction, |error|)."""

    headline = ("val/loss",)

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

    def build_model(self) -> nn.Module:
        return get_model(self.model_name, **self.kwargs)

    def optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        groups = param_groups(model, self.weight_decay)
        return {"model": torch.optim.AdamW(groups, betas=self.betas)}

    def loss(self, model, batch, info, optimizer, device) -> torch.Tensor:
        return model(batch["image"].to(device, non_blocking=True).float())["loss"]

    @torch.no_grad()
    def evaluate(self, model, shard, split: str, ctx: EvalContext) -> Evaluation:
        """Masked loss per channel over this worker's shard, summed over every worker. The
        masks are drawn from a fixed seed, so validations are comparable across steps."""
        model.eval()
        sums = torch.zeros(len(self.channels), dtype=torch.float64, device=ctx.device)
        weight = torch.zeros((), dtype=torch.float64, device=ctx.device)
        samples = []
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 12345)
            for batch in shard.iter_torch_batches(
                batch_size=ctx.batch_size, prefetch_batches=ctx.prefetch_batches
            ):
                imgs = batch["image"].to(ctx.device).float()
                with autocast(ctx.device, ctx.precision):
                    out = model(imgs)
                s, w = model.channel_errors(imgs, out["pred"].float(), out["mask"])
                sums += s.double()
                weight += w.double()
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
        from sdofm.tracking import reconstruction_figure

        image, masked, recon, t = sample
        when = np.datetime64(t, "ns").astype("datetime64[s]")
        title = f"step {step} | val sample {i} | {when}"
        fig = reconstruction_figure(image, masked, recon, self.channels, title=title)
        return f"reconstructions/step_{step:08d}_{i}.png", fig

    def checkpoint_meta(self, model: nn.Module) -> dict:
        return {"encoder_config": model.encoder_config, "channels": self.channels}

    def tokens_per_sample(self, model: nn.Module) -> int:
        return model.num_patches

"""The Ray Train loop: one ``train_loop_per_worker`` for any backbone that returns its loss.

Each worker reads its shard of the train split from Ray Data, runs forward/backward
under DDP (gloo on CPU, NCCL on GPU), and every ``log_every`` steps reports loss,
learning rate, gradient norm and throughput. Every ``checkpoint_every`` steps rank 0
saves model, optimiser, step and data position through ``ray.train.report``; a
restarted or re-run worker group picks it up from ``ray.train.get_checkpoint()``.
Rank 0 alone writes to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdofm.config import Config, ConfigError
from sdofm.models import get_model

CHECKPOINT_STATE = "state.json"
CHECKPOINT_MODEL = "model.pt"
CHECKPOINT_OPTIMIZER = "optimizer.pt"


@dataclass
class TrainState:
    """Where training is: optimiser steps done, data epoch, batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def say(message: str) -> None:
    """A progress line on the real stdout (Ray Train's print patch would log it twice)."""
    print(f"[sdofm] {message}", file=sys.__stdout__, flush=True)


class _QuietReports(logging.Filter):
    """Drops Ray Train's per-report INFO line (it repeats every metric of every rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Reporting training result")


def quiet_reports() -> None:
    """Install :class:`_QuietReports` on this worker's log handlers."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietReports())


def build_model(cfg: Config, sample_shape: tuple[int, int, int, int]) -> nn.Module:
    """The configured backbone for images of ``sample_shape`` = (C, T, H, W).

    Image size, channels and frames follow the data; set in ``model.overrides`` they must
    agree with it.
    """
    C, T, H, _ = sample_shape
    from_data = {"img_size": H, "in_chans": C, "num_frames": T}
    for key, value in from_data.items():
        given = cfg.model.overrides.get(key)
        if given is not None and given != value:
            raise ConfigError(
                f"model.overrides.{key} = {given} but the data give {value} "
                f"({C} channels {cfg.data.channels}, {T} frames, {H} px); "
                f"remove the override or change the data config"
            )
    return get_model(cfg.model.name, **{**from_data, **cfg.model.overrides})


def effective_batch(cfg: Config, world: int | None = None) -> int:
    """Samples per optimiser step: batch per worker x workers x accumulation."""
    world = cfg.scaling.num_workers if world is None else world
    return cfg.loader.batch_size * world * cfg.train.grad_accum


def peak_lr(cfg: Config, world: int | None = None) -> float:
    """MAE's rule: ``train.lr x effective batch / train.lr_batch``."""
    return cfg.train.lr * effective_batch(cfg, world) / cfg.train.lr_batch


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and tokens (1-D parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or p.shape[:2] == (1, 1) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak``
    at ``total`` steps. ``step`` counts from 0 (the lr of the first optimiser step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (``auto`` or ``bf16``); fp32 otherwise."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(
    path: Path, model: nn.Module, optimizer, state: TrainState, extra: dict
) -> None:
    torch.save(unwrap(model).state_dict(), path / CHECKPOINT_MODEL)
    torch.save(optimizer.state_dict(), path / CHECKPOINT_OPTIMIZER)
    (path / CHECKPOINT_STATE).write_text(json.dumps({**asdict(state), **extra}, indent=1))


def load_checkpoint(path: Path, model: nn.Module, optimizer=None) -> TrainState:
    model.load_state_dict(torch.load(path / CHECKPOINT_MODEL, map_location="cpu"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / CHECKPOINT_OPTIMIZER, map_location="cpu"))
    raw = json.loads((path / CHECKPOINT_STATE).read_text())
    return TrainState(**{k: raw[k] for k in ("step", "epoch", "batch_in_epoch")})


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def validate(model: nn.Module, shard, cfg: Config, device, figures: int):
    """Masked loss per channel over this worker's val shard, summed over every worker.

    The masks are drawn from a fixed seed, so validations are comparable across steps.
    -> (loss per channel (C,), up to ``figures`` (image, masked, recon) triples (C, T, H, W)).
    """
    core = unwrap(model)
    core.eval()
    sums = torch.zeros(len(cfg.data.channels), dtype=torch.float64, device=device)
    weight = torch.zeros((), dtype=torch.float64, device=device)
    samples = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed + 12345)
        for batch in shard.iter_torch_batches(
            batch_size=cfg.loader.batch_size, prefetch_batches=cfg.loader.prefetch_batches
        ):
            imgs = batch["image"].to(device).float()
            with autocast(device, cfg.train.precision):
                out = core(imgs)
            s, w = core.channel_errors(imgs, out["pred"].float(), out["mask"])
            sums += s.double()
            weight += w.double()
            if len(samples) < figures:
                masked, recon = core.reconstruct(imgs, out["pred"].float(), out["mask"])
                for i in range(min(figures - len(samples), len(imgs))):
                    samples.append(
                        tuple(x[i].cpu().numpy() for x in (imgs, masked, recon))
                        + (int(batch["time"][i, -1]),)
                    )
    core.train()
    _all_reduce(sums)
    _all_reduce(weight)
    return (sums / weight.clamp_min(1e-12)).float().cpu(), samples


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function.

    ``config``: ``cfg`` (the dumped :class:`Config`), ``sample_shape``, ``total_steps``,
    ``tracking_uri``, ``run_id`` (None: MLflow unreachable), ``fallback_dir``.
    """
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(config["cfg"])
    tc, lc = cfg.train, cfg.loader
    quiet_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)

    model = build_model(cfg, tuple(config["sample_shape"])).to(device)
    top_lr = peak_lr(cfg, world)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=top_lr, betas=tc.betas)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None
    if resumed:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), model, optimizer)
    model = ray.train.torch.prepare_model(model)
    if tc.compile:
        model = torch.compile(model)
    core = unwrap(model)

    tracker = None
    if rank == 0:
        from sdofm.tracking import Tracker

        tracker = Tracker(config["tracking_uri"], config["run_id"], config["fallback_dir"])
        if cfg.tracking.system_metrics:
            tracker.start_system_metrics()
        if resumed:
            say(f"resumed at step {state.step} (epoch {state.epoch})")
            tracker.set_tags({"sdofm.resumed_at_step": str(state.step)})

    total = config["total_steps"]
    tokens_per_sample = core.num_patches
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None

    def report(metrics: dict, save: bool) -> None:
        """Metrics to MLflow (rank 0) at every call; to Ray Train only with a checkpoint or a
        validation. Ray Train's controller takes one report per poll (2 s): reporting every
        few steps would stall fast steps, so the per-step metrics go straight to MLflow."""
        if rank == 0:
            tracker.log_metrics(metrics, step=state.step)
        if not save:
            if "val/loss" in metrics:
                ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                extra = {
                    "run_id": config["run_id"],
                    "encoder_config": core.encoder_config,
                    "channels": cfg.data.channels,
                }
                save_checkpoint(Path(tmp), model, optimizer, state, extra)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(
                metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{state.step:08d}"
            )

    def run_validation() -> dict:
        if val_shard is None:
            return {}
        losses, samples = validate(
            model, val_shard, cfg, device, cfg.tracking.figures if rank == 0 else 0
        )
        metrics = {
            f"val/loss_{c}": float(v) for c, v in zip(cfg.data.channels, losses, strict=True)
        }
        metrics["val/loss"] = float(losses.mean())
        if rank == 0:
            from sdofm.tracking import reconstruction_figure

            for i, (img, masked, recon, t) in enumerate(samples):
                when = np.datetime64(t, "ns").astype("datetime64[s]")
                fig = reconstruction_figure(
                    img[:, -1],
                    masked[:, -1],
                    recon[:, -1],
                    cfg.data.channels,
                    title=f"step {state.step} | val sample {i} | {when}",
                )
                tracker.log_figure(fig, f"reconstructions/step_{state.step:08d}_{i}.png")
            say(f"step {state.step}: val loss {metrics['val/loss']:.4f}")
        return metrics

    model.train()
    window_start, window_samples, window_steps = time.perf_counter(), 0, 0
    loss_sum = torch.zeros((), device=device)
    micro = 0
    last_saved = state.step
    done = state.step >= total
    while not done and state.epoch < tc.epochs:
        skip = state.batch_in_epoch
        for i, batch in enumerate(
            train_shard.iter_torch_batches(
                batch_size=lc.batch_size,
                prefetch_batches=lc.prefetch_batches,
                local_shuffle_buffer_size=lc.shuffle_buffer or None,
            )
        ):
            if i < skip:  # a resumed epoch: these batches were trained on before the checkpoint
                continue
            imgs = batch["image"].to(device, non_blocking=True).float()
            micro += 1
            last_micro = micro % tc.grad_accum == 0
            sync = (
                contextlib.nullcontext()
                if last_micro or not hasattr(model, "no_sync")
                else model.no_sync()
            )
            with sync:
                with autocast(device, tc.precision):
                    loss = model(imgs)["loss"]
                if not torch.isfinite(loss):
                    times = np.asarray(batch["time"][:, -1]).astype("datetime64[ns]")
                    raise FloatingPointError(
                        f"non-finite loss {float(loss)} at step {state.step} (epoch {state.epoch}, "
                        f"rank {rank}); batch samples {batch['sample'].tolist()} at {times.tolist()}"
                    )
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach()
            window_samples += len(imgs)
            state.batch_in_epoch = i + 1
            if not last_micro:
                continue

            lr = lr_at(state.step, top_lr, tc.warmup_steps, total, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = nn.utils.clip_grad_norm_(
                core.parameters(), tc.grad_clip if tc.grad_clip else float("inf")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            window_steps += 1
            if tc.fail_at_step == state.step and rank == 0:
                marker = Path(config["fallback_dir"]) / "injected_failure"
                if not marker.exists():  # once per run, whichever attempt gets here first
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.touch()
                    raise RuntimeError(
                        f"injected failure at step {state.step} (train.fail_at_step)"
                    )

            done = state.step >= total
            log = state.step % tc.log_every == 0 or done
            save = state.step % tc.checkpoint_every == 0 or done
            val = state.step % tc.val_every == 0 or done
            if not (log or save or val):
                continue
            metrics: dict[str, float] = {"step": state.step, "epoch": state.epoch}
            if window_steps:
                elapsed = time.perf_counter() - window_start
                mean_loss = _all_reduce(loss_sum.clone()) / (world * window_steps * tc.grad_accum)
                samples_per_s = window_samples * world / elapsed
                metrics.update(
                    {
                        "train/loss": float(mean_loss),
                        "train/lr": lr,
                        "train/grad_norm": float(grad_norm),
                        "train/samples_per_s": samples_per_s,
                        "train/tokens_per_s": samples_per_s * tokens_per_sample,
                    }
                )
                if rank == 0:
                    say(
                        f"step {state.step}/{total} epoch {state.epoch} "
                        f"loss {metrics['train/loss']:.4f} lr {lr:.2e} |g| {float(grad_norm):.3f} "
                        f"{samples_per_s:.1f} samples/s"
                    )
            if val:
                metrics.update(run_validation())
            report(metrics, save)
            last_saved = state.step if save else last_saved
            window_start, window_samples, window_steps = time.perf_counter(), 0, 0
            loss_sum.zero_()
            if done:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    if state.step > last_saved:  # the epochs ran out before total_steps (it is an estimate)
        report({"step": state.step, "epoch": state.epoch, **run_validation()}, save=True)
    if rank == 0:
        tracker.close()

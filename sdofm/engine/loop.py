"""The Ray Train worker loop, one for every objective (after MAE's ``engine_pretrain.py``).

``train_loop_per_worker`` sets up a :class:`Worker` (device, model, optimisers, resume,
rank-0 tracking) and runs ``train_one_epoch`` until the run is over. At log, validation
and checkpoint steps (or at each epoch's end, for intervals left None)
``report_and_checkpoint`` logs the metrics to MLflow from rank 0, evaluates, and hands a
checkpoint to Ray Train. Ray Train gets a report only at validations and checkpoints:
its controller takes one report per 2 s poll, so per-step reports would stall fast steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sdofm.config import Config
from sdofm.console import quiet_reports, say
from sdofm.datasets.device import PinnedCopies
from sdofm.engine.checkpoint import (
    TrainState,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from sdofm.engine.objective import (
    EvalContext,
    Objective,
    Phase,
    Schedule,
    StepInfo,
    all_reduce_sum,
)
from sdofm.engine.optim import autocast
from sdofm.storage import join
from sdofm.tracking import Tracker


@dataclass
class LoopConfig:
    """Everything the worker loop needs besides the objective and the data."""

    epochs: int
    """Passes over the train split."""
    schedule_steps: int
    """Optimiser steps of the lr schedule (warm-up + cosine)."""
    lr: float
    """Peak learning rate (of every optimiser the objective does not schedule itself)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps; None: after ``epochs``."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    log_every: int | None = 10
    """Steps between train-metric logs; None: at each epoch's end."""
    val_every: int | None = 200
    """Steps between validations; None: at each epoch's end. Always at the end."""
    checkpoint_every: int | None = 200
    """Steps between checkpoints; None: at each epoch's end. Always at the end."""
    splits: tuple[str, ...] = ("train",)
    """Datasets handed to the trainer: ``train``, and ``val`` (every validation) and
    ``test`` (the last one) when present."""
    batch_size: int = 8
    prefetch_batches: int = 2
    shuffle_buffer: int = 0
    """Local shuffle buffer of the consumer (samples; 0: none)."""
    ordered: bool = True
    """Blocks reach the workers in the plan's order and split the same way every run."""
    seed: int = 0
    """Seed of the weights, the shuffle buffer (plus the epoch) and the objective's draws."""
    precision: str = "auto"
    compile: bool = False
    deterministic: bool = False
    """Deterministic kernels only (``train.deterministic``)."""
    torch_threads: int | None = None
    figures: int = 1
    """Figures rank 0 draws at each evaluation."""
    label: str = ""
    """Prefix of the progress lines (a sweep's trial)."""
    tracking_uri: str = ""
    run_id: str | None = None
    """The MLflow run (None: metrics go to ``fallback_dir``)."""
    fallback_dir: str = ""
    system_metrics: bool = False
    run_name: str = ""
    """The run's folder under ``storage`` (set by ``fit``)."""
    storage: str = ""
    """Where checkpoints go: a folder or fsspec URL (set by ``fit``)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options of ``storage`` (set by ``fit``)."""
    epoch_registries: dict[str, Any] = field(default_factory=dict)
    """split -> an actor with ``set_epoch(epoch)``: the data's epoch follows the checkpoint
    a worker resumes from (the order of samples depends on it)."""
    image_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Applied to each batch's ``image`` once it is on the device (train and evaluation):
    the model-input transforms when the readers only decode (``transform.on: device``)."""


def deterministic_kernels() -> None:
    """Only deterministic kernels from here on, in this process: cuBLAS with a fixed
    workspace (set before its first use), cuDNN without autotuning and with deterministic
    algorithms, no TF32, and an error from any op that has no deterministic version."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)


def loop_config(cfg: Config, **job: Any) -> LoopConfig:
    """The loop settings of ``cfg`` that every job shares (clip, accumulation, precision,
    compile, seed, loader, threads, figures, system metrics), with what the job sets
    itself in ``job`` (epochs, schedule, lr, batch size, intervals, splits, run)."""
    tc = cfg.train
    shared = {
        "min_lr_ratio": tc.min_lr_ratio,
        "grad_clip": tc.grad_clip,
        "grad_accum": tc.grad_accum,
        "prefetch_batches": cfg.loader.prefetch_batches,
        "shuffle_buffer": cfg.loader.shuffle_buffer,
        "ordered": cfg.loader.ordered,
        "seed": tc.seed,
        "precision": tc.precision,
        "compile": tc.compile,
        "deterministic": tc.deterministic,
        "torch_threads": cfg.scaling.torch_threads,
        "figures": cfg.tracking.figures,
        "system_metrics": cfg.tracking.system_metrics,
    }
    return LoopConfig(**{**shared, **job})


def batch_options(lc: LoopConfig, epoch: int) -> dict:
    """How a worker iterates its train shard in ``epoch`` (``iter_torch_batches`` or
    ``iter_batches`` keywords): batch size, prefetch, and the consumer's shuffle buffer
    when one is set (seeded by the seed plus the epoch)."""
    return {
        "batch_size": lc.batch_size,
        "prefetch_batches": lc.prefetch_batches,
        "local_shuffle_buffer_size": lc.shuffle_buffer or None,
        "local_shuffle_seed": lc.seed + epoch if lc.shuffle_buffer else None,
    }


class DeviceShard:
    """A dataset shard whose torch batches arrive with the image on the device and
    ``transform`` applied to it; every other attribute is the shard's."""

    def __init__(self, shard, transform: Callable, device: torch.device):
        self.shard, self.transform, self.device = shard, transform, device
        self.send = PinnedCopies(device)

    def iter_torch_batches(self, **kwargs):
        for batch in self.shard.iter_torch_batches(**kwargs):
            batch["image"] = self.transform(self.send(batch["image"]))
            yield batch

    def iter_batches(self, **kwargs):
        raise TypeError(
            "images transformed on the device come as torch batches only: this objective "
            "reads numpy batches, so set transform.on=reader"
        )

    def __getattr__(self, name: str):
        return getattr(self.shard, name)


class Worker:
    """One training worker: the model, its optimisers, where training is, and the data."""

    def __init__(self, lc: LoopConfig, objective: Objective):
        import ray.train
        import ray.train.torch

        quiet_reports()
        self.lc, self.objective = lc, objective
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if lc.torch_threads:
            torch.set_num_threads(lc.torch_threads)
        if lc.deterministic:
            deterministic_kernels()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(lc.seed)
        model = objective.build_model().to(self.device)
        self.optimizers = objective.optimizers(model)
        self.phases: tuple[Phase, ...] = objective.phases
        missing = {p.optimizer for p in self.phases} - set(self.optimizers)
        if missing:
            raise ValueError(f"{type(objective).__name__}: phases name no optimiser {missing}")
        default = Schedule(lc.lr, lc.warmup_steps, lc.schedule_steps, lc.min_lr_ratio, lc.grad_clip)
        self.schedules = objective.schedules(default)
        self.params = {
            k: [p for g in o.param_groups for p in g["params"]] for k, o in self.optimizers.items()
        }
        self.averagers = (
            {k: GradientAverager(ps, self.world) for k, ps in self.params.items()}
            if self.world > 1
            else {}
        )
        self.state = TrainState()
        # The newest complete checkpoint on storage, not ray.train.get_checkpoint(): Ray's
        # record can lag one report behind what is committed (its controller polls).
        latest = latest_checkpoint(lc.storage, lc.run_name, lc.storage_options)
        self.resumed = latest is not None
        if latest is not None:
            self.state = load_checkpoint(latest.url, model, self.optimizers, lc.storage_options)
        # Every worker starts from rank 0's weights. Gradients are averaged over the
        # workers per phase (``GradientAverager``) rather than by a DDP wrapper: DDP
        # reduces whatever one backward reaches, which is wrong when a step has phases
        # that each train one network of several.
        _broadcast(model.state_dict().values())
        self.core = model
        self.model = torch.compile(model) if lc.compile else model
        self.shards = {s: ray.train.get_dataset_shard(s) for s in lc.splits}
        if lc.image_transform is not None:
            if objective.batch_format != "torch":
                raise TypeError(
                    f"{type(objective).__name__} reads {objective.batch_format} batches: "
                    "the images cannot be transformed on the device; set transform.on=reader"
                )
            self.shards = {
                s: DeviceShard(shard, lc.image_transform, self.device)
                for s, shard in self.shards.items()
            }
        self.tracker = None
        if self.rank == 0:
            self.tracker = Tracker(lc.tracking_uri, lc.run_id, lc.fallback_dir, lc.storage_options)
            if lc.system_metrics:
                self.tracker.start_system_metrics()
            if latest is not None:
                say(f"resumed at step {self.state.step} (epoch {self.state.epoch})")
                self.tracker.set_tags({"sdofm.resumed_at_step": str(self.state.step)})
                # The interval the checkpoint covers may have missed MLflow (a failure
                # between the commit and the flush): send what is not there yet.
                self.tracker.log_records(read_metrics(latest.url, lc.storage_options), missing=True)
        self.micro = 0
        """Micro-batches of the gradient accumulation under way (it may run on into the
        next epoch)."""
        self.held: list[dict] = []
        """Those micro-batches, kept when several phases are due at this step."""
        self.pending: dict[int, dict] = {}
        """Metrics since the last checkpoint, by step: MLflow gets them once that checkpoint
        is committed, so a resumed run logs every step once."""
        self.tokens_per_sample = objective.tokens_per_sample(self.core)
        self.finished = self.state.epoch >= lc.epochs or self._reached_max_steps()
        self.last_val = self.last_save = self.state.step
        self._reset_window()

    def _reached_max_steps(self) -> bool:
        return self.lc.max_steps is not None and self.state.step >= self.lc.max_steps

    def _reset_window(self) -> None:
        self.window_start, self.window_samples, self.window_steps = time.perf_counter(), 0, 0
        self.loss_sums = {p.name: torch.zeros((), device=self.device) for p in self.phases}
        self.phase_runs = {p.name: 0 for p in self.phases}
        self.grad_norms: dict[str, float] = {}
        self.lrs: dict[str, float] = {}

    def batches(self):
        """This epoch's train batches, less those consumed before a resumed checkpoint."""
        lc = self.lc
        kwargs = batch_options(lc, self.state.epoch)
        shard = self.shards["train"]
        if self.objective.batch_format == "numpy":
            it = shard.iter_batches(batch_format="numpy", **kwargs)
        else:
            it = shard.iter_torch_batches(**kwargs)
        registry = lc.epoch_registries.get("train")
        if registry is not None:
            import ray

            ray.get(registry.set_epoch.remote(self.state.epoch))
        skip = self.state.batch_in_epoch
        for i, batch in enumerate(it):
            if i >= skip:
                self.state.batch_in_epoch = i + 1
                yield batch

    def train_step(self, batch: dict) -> bool:
        """Take one micro-batch; after the last of an accumulation, one optimiser step
        (-> True): every phase due at this step, in order, then ``after_step``.

        With one phase due, each micro-batch's backward runs as it arrives; with several,
        the micro-batches are held until the step, since each phase must see all of them
        before the next phase starts."""
        lc, state = self.lc, self.state
        info = StepInfo(state.step, state.epoch, lc.schedule_steps)
        due = [(i, p) for i, p in enumerate(self.phases) if state.step % p.every == 0]
        self.window_samples += len(batch["sample"])
        if len(due) == 1:
            self._backward(*due[0], self.micro, batch, info)
        else:
            self.held.append(batch)
        self.micro += 1
        if self.micro < lc.grad_accum:
            return False
        for index, phase in due:
            for micro, held in enumerate(self.held):
                self._backward(index, phase, micro, held, info)
            self._step(phase)
        self.micro, self.held = 0, []
        self.objective.after_step(self.core, info)
        # Buffers (batch-norm statistics) follow rank 0, as DDP's broadcast_buffers does.
        _broadcast(self.core.buffers())
        state.step += 1
        self.window_steps += 1
        return True

    def _backward(self, index: int, phase: Phase, micro: int, batch: dict, info: StepInfo):
        """Forward and backward of one micro-batch for ``phase``: only its optimiser's
        parameters take gradients."""
        lc, state = self.lc, self.state
        trains = {id(p) for p in self.params[phase.optimizer]}
        saved = {}
        for name, other in self.params.items():
            if name != phase.optimizer:
                for p in other:
                    if id(p) not in trains:
                        saved[p] = p.requires_grad
                        p.requires_grad_(False)
        averager = self.averagers.get(phase.optimizer)
        try:
            # The objective's draws (masks, noise) follow the step, so a resumed run
            # repeats exactly what an uninterrupted one would have drawn.
            torch.manual_seed(_draw_seed(lc.seed, state.step, micro, self.rank, index))
            with autocast(self.device, lc.precision):
                loss = self.objective.loss(self.model, batch, info, phase.name, self.device)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite {phase.name} loss {float(loss)} at step {state.step} "
                    f"(epoch {state.epoch}, rank {self.rank}); {self.objective.describe(batch)}"
                )
            if averager is not None and micro == lc.grad_accum - 1:
                # The all-reduce of each bucket starts as soon as its gradients are
                # complete, while the backward pass goes on (as DDP overlaps it).
                with averager:
                    (loss / lc.grad_accum).backward()
            else:
                (loss / lc.grad_accum).backward()
            self.loss_sums[phase.name] += loss.detach()
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)

    def _step(self, phase: Phase) -> None:
        """``phase``'s gradients averaged over the workers, clipped, and its optimiser's step."""
        opt, params = self.optimizers[phase.optimizer], self.params[phase.optimizer]
        self.phase_runs[phase.name] += 1
        averager = self.averagers.get(phase.optimizer)
        if averager is not None:
            averager.finish()
        schedule = self.schedules[phase.optimizer]
        lr = schedule.lr_at(self.state.step)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        norm = nn.utils.clip_grad_norm_(params, schedule.grad_clip or float("inf"))
        self.grad_norms[phase.name] = float(norm)
        self.lrs[phase.optimizer] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_metrics(self) -> dict[str, float]:
        """Loss, lr, gradient norm and throughput since the last report, over every worker."""
        if not self.window_steps:
            return {}
        elapsed = time.perf_counter() - self.window_start
        single = len(self.phases) == 1
        out = {}
        for name, total in self.loss_sums.items():
            runs = self.phase_runs[name]
            if not runs:
                continue  # a lazy phase that was not due in this window
            key = "train/loss" if single else f"train/loss_{name}"
            out[key] = float(
                all_reduce_sum(total.clone()) / (self.world * runs * self.lc.grad_accum)
            )
            out[key.replace("loss", "grad_norm")] = self.grad_norms[name]
        for name, lr in self.lrs.items():
            out["train/lr" if len(self.lrs) == 1 else f"train/lr_{name}"] = lr
        samples_per_s = self.window_samples * self.world / elapsed
        out["train/samples_per_s"] = samples_per_s
        if self.tokens_per_sample:
            out["train/tokens_per_s"] = samples_per_s * self.tokens_per_sample
        return out

    def due(self, epoch_end: bool) -> dict[str, bool]:
        """What to do now: after an optimiser step (intervals), or at an epoch's end."""
        lc, step = self.lc, self.state.step
        if not epoch_end:

            def at(every):
                return every is not None and step % every == 0

            return {
                "log": at(lc.log_every),
                "val": at(lc.val_every),
                "save": at(lc.checkpoint_every),
                "final": False,
            }
        final = self._reached_max_steps() or self.state.epoch >= lc.epochs
        return {
            "log": final or lc.log_every is None,
            "val": (final or lc.val_every is None) and self.last_val != step,
            "save": (final or lc.checkpoint_every is None) and self.last_save != step,
            "final": final,
        }

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def validate(w: Worker, final: bool) -> dict[str, float]:
    """Evaluate ``val`` (and ``test`` at the end) on every worker; rank 0 logs the figures."""
    metrics: dict[str, float] = {}
    for split in ("val", "test") if final else ("val",):
        if split not in w.shards:
            continue
        ctx = EvalContext(
            device=w.device,
            batch_size=w.lc.batch_size,
            prefetch_batches=w.lc.prefetch_batches,
            precision=w.lc.precision,
            rank=w.rank,
            step=w.state.step,
            final=final,
            figures=w.lc.figures if w.rank == 0 else 0,
        )
        result = w.objective.evaluate(w.core, w.shards[split], split, ctx)
        metrics.update(result.metrics)
        for path, fig in result.figures:
            w.tracker.log_figure(fig, path)
    w.last_val = w.state.step
    return metrics


def report_and_checkpoint(w: Worker, log: bool, val: bool, save: bool, final: bool) -> None:
    """Metrics (rank 0 keeps them until the next checkpoint); at validations and checkpoints
    a report to Ray Train. A checkpoint is committed by rank 0 on storage, then its interval's
    metrics go to MLflow, then Ray Train is told where it is."""
    import ray.train
    from ray.train import CheckpointUploadMode

    if not (log or val or save):
        return
    state = w.state
    metrics: dict = {"step": state.step, "epoch": state.epoch, **w.train_metrics()}
    if val:
        metrics.update(validate(w, final))
    if w.rank == 0:
        w.pending.setdefault(state.step, {"time": int(time.time() * 1000)}).update(metrics)
        say(_progress_line(w, metrics))
    w._reset_window()
    if not (val or save):
        return
    checkpoint = None
    if save and w.rank == 0:
        lc, name = w.lc, checkpoint_name(state.step)
        records = [{"step": s, **m} for s, m in sorted(w.pending.items())]
        meta = {"run_id": lc.run_id, **w.objective.checkpoint_meta(w.core)}
        save_checkpoint(
            join(lc.storage, lc.run_name, name),
            w.model,
            w.optimizers,
            state,
            meta,
            metrics=records,
            storage_options=lc.storage_options,
        )
        w.tracker.log_records(records)
        w.pending = {}
        ray_storage = ray.train.get_context().get_storage()
        checkpoint = ray.train.Checkpoint(
            path=f"{ray_storage.experiment_fs_path}/{name}",
            filesystem=ray_storage.storage_filesystem,
        )
    report = {**metrics, "mlflow_run_id": w.lc.run_id or ""}  # a sweep finds a trial's run
    if save:  # ... and the checkpoint of its best trial (Ray's path has lost the s3:// scheme)
        report["checkpoint_url"] = join(w.lc.storage, w.lc.run_name, checkpoint_name(state.step))
    ray.train.report(
        report,
        checkpoint=checkpoint,
        checkpoint_dir_name=checkpoint_name(state.step) if save else None,
        checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,  # rank 0 wrote it above
    )
    if save:
        w.last_save = state.step


def _progress_line(w: Worker, m: dict) -> str:
    lc = w.lc
    total = lc.max_steps or lc.schedule_steps
    parts = [f"step {m['step']}/{total} epoch {m['epoch']}/{lc.epochs}"]
    if lc.label:
        parts.insert(0, lc.label)
    losses = [(k[len("train/") :], v) for k, v in m.items() if k.startswith("train/loss")]
    if losses:
        lrs = [(k[len("train/") :], v) for k, v in m.items() if k.startswith("train/lr")]
        parts.append(
            " ".join(f"{k} {v:.4f}" for k, v in losses)
            + "".join(f" {k} {v:.2e}" for k, v in lrs)
            + f" {m['train/samples_per_s']:.1f} samples/s"
        )
    parts += [f"{k} {v:.4f}" for k, v in m.items() if k in w.objective.headline]
    return " | ".join(parts)


def _draw_seed(seed: int, step: int, micro: int, rank: int, phase: int) -> int:
    """The seed of one phase's draws on one micro-batch of one worker at one step."""
    base = ((seed * 1_000_003 + step) * 1024 + micro) * 4096 + rank
    if phase == 0:
        return base
    return int(np.random.SeedSequence([base, phase]).generate_state(1)[0])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _flat_buckets(tensors: list[torch.Tensor], bucket_bytes: int = 64 << 20):
    """``tensors`` grouped by dtype and device into runs of at most ``bucket_bytes``."""
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    for t in tensors:
        runs = groups.setdefault((t.dtype, t.device), [[]])
        if runs[-1] and sum(x.numel() for x in runs[-1]) * t.element_size() >= bucket_bytes:
            runs.append([])
        runs[-1].append(t)
    return [run for runs in groups.values() for run in runs if run]


class GradientAverager:
    """Averages the gradients of one optimiser's parameters over every worker, in buckets
    of about ``bucket_bytes``: within ``with averager:`` around the last backward of a
    phase, a bucket's all-reduce starts as soon as its last gradient is accumulated;
    ``finish()`` starts those not started (a parameter with no gradient counts as zero),
    waits for all and writes the averages back."""

    def __init__(self, params: list[nn.Parameter], world: int, bucket_bytes: int = 25 << 20):
        self.world = world
        self.buckets: list[list[nn.Parameter]] = []
        size = bucket_bytes
        for p in reversed(params):  # the backward pass reaches the last layers first
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.pending: list[int] = []
        self.works: list = []
        self.hooks: list = []

    def __enter__(self) -> GradientAverager:
        self.pending = [len(b) for b in self.buckets]
        self.works = [None] * len(self.buckets)
        self.hooks = [
            p.register_post_accumulate_grad_hook(self._ready) for b in self.buckets for p in b
        ]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _ready(self, p: nn.Parameter) -> None:
        i = self.bucket_of[id(p)]
        self.pending[i] -= 1
        if self.pending[i] == 0:
            self._launch(i)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        for p in bucket:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        self.works[i] = (flat, dist.all_reduce(flat, async_op=True))

    def finish(self) -> None:
        if not self.works:  # the phase ran no backward under ``with``
            self.works = [None] * len(self.buckets)
        for i, started in enumerate(self.works):
            if started is None:
                self._launch(i)
        for bucket, (flat, work) in zip(self.buckets, self.works, strict=True):
            work.wait()
            flat /= self.world
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self.works = []


def _broadcast(tensors) -> None:
    """Rank 0's values of ``tensors`` (parameters, buffers) on every worker, in place."""
    if not _distributed():
        return
    with torch.no_grad():
        for run in _flat_buckets([t for t in tensors if t.numel()]):
            flat = torch.cat([t.detach().reshape(-1) for t in run])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in run:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def train_one_epoch(w: Worker) -> None:
    """One pass over this worker's train shard (the rest of it, when resuming mid-epoch)."""
    for batch in w.batches():
        if not w.train_step(batch):
            continue  # a micro-batch of a gradient accumulation
        if w._reached_max_steps():
            break
        report_and_checkpoint(w, **w.due(epoch_end=False))
    else:
        w.state.epoch += 1
        w.state.batch_in_epoch = 0
    due = w.due(epoch_end=True)
    report_and_checkpoint(w, **due)
    w.finished = due["final"]


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function: ``config = {"loop": LoopConfig, "objective": Objective}``."""
    w = Worker(config["loop"], config["objective"])
    while not w.finished:
        train_one_epoch(w)
    w.close()

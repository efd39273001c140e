"""AIA autocalibration ("dimming", Dos Santos et al. 2021, A&A 648, A53).

Each AIA channel c of a sample is dimmed by a factor alpha_c drawn from [alpha_min, 1]
in physical units (DN/s), before scaling and z-scoring; a head on the pretrained encoder
predicts alpha for every AIA channel. The channels are physically related, so the
factors are learnable from the image although one channel alone is ambiguous.

The Ray Data pipeline delivers images in physical units (resized, limb handled); the
worker dims them with factors that are a pure function of (seed, split, epoch, sample)
and applies the scaling and z-score of the pretraining transform.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdofm.config import Config, ConfigError, dump_config
from sdofm.datasets.blocks import make_preprocessor, physical_transform
from sdofm.models.heads import BaselineCNN, EncoderRegressor
from sdofm.models.mae import MAEEncoder

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
HEAD_FILE = "regressor.pt"


# --------------------------------------------------------------------------- the task


def dimmed_channels(cfg: Config) -> list[int]:
    """Positions of the AIA channels (the ones dimmed and predicted) among the inputs."""
    idx = [i for i, c in enumerate(cfg.data.channels) if c in cfg.data.aia_channels]
    if not idx:
        raise ConfigError("dimming needs AIA channels: data.aia_channels is empty")
    return idx


class Dimming:
    """Physical images -> (dimmed, scaled, z-scored images, alpha).

    ``alphas`` are drawn from [alpha_min, 1] by a generator seeded with (seed, split, epoch,
    sample id): reproducible, fresh per epoch on train, fixed on val and test.
    """

    def __init__(self, cfg: Config, stats: dict | None, size: int):
        self.channels = dimmed_channels(cfg)
        self.alpha_min = cfg.finetune.alpha_min
        self.seed = cfg.finetune.dim_seed
        self.pre = make_preprocessor(
            cfg.data.channels, cfg.transform, size, stats
        )  # no resize: images come at ``size``

    def alphas(self, sample_ids: np.ndarray, split: str, epoch: int) -> np.ndarray:
        """sample_ids: (n,) -> (n, K) float32 in [alpha_min, 1]."""
        code = SPLIT_CODE[split]
        return np.stack(
            [
                np.random.default_rng([self.seed, code, epoch, int(s)]).uniform(
                    self.alpha_min, 1.0, len(self.channels)
                )
                for s in sample_ids
            ]
        ).astype(np.float32)

    def __call__(
        self, images: np.ndarray, sample_ids: np.ndarray, split: str, epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """images: (n, C, T, H, W) physical -> ((n, C, T, H, W) model inputs, (n, K) alpha)."""
        x = np.array(images, dtype=np.float32)  # ours to change in place
        alpha = self.alphas(sample_ids, split, epoch)
        x[:, self.channels] *= alpha[:, :, None, None, None]
        for j in range(len(x)):
            self.pre.apply_(x[j])
        return x, alpha


# --------------------------------------------------------------------------- the backbone


@dataclass
class Backbone:
    """A pretrained encoder: its constructor arguments, weights, and where it came from."""

    encoder_config: dict
    state_dict: dict
    source: str
    run_id: str | None = None
    channels: list[str] | None = None

    def encoder(self) -> MAEEncoder:
        """The encoder with these weights; only decoder keys may be left unused."""
        enc = MAEEncoder(**self.encoder_config)
        result = enc.load_state_dict(self.state_dict, strict=False)
        assert result.missing_keys == [], (
            f"{self.source}: encoder keys missing {result.missing_keys}"
        )
        stray = [
            k for k in result.unexpected_keys if not (k.startswith("decoder_") or k == "mask_token")
        ]
        assert not stray, f"{self.source}: unexpected non-decoder keys {stray}"
        return enc

    def check(self, cfg: Config, sample_shape: tuple[int, int, int, int]) -> None:
        """A clear error when the backbone does not fit the data config."""
        C, T, H, _ = sample_shape
        ec = self.encoder_config
        img = ec["img_size"] if isinstance(ec["img_size"], int) else ec["img_size"][0]
        problems = []
        if self.channels is not None and list(self.channels) != list(cfg.data.channels):
            problems.append(f"channels {self.channels} vs data {cfg.data.channels}")
        elif ec["in_chans"] != C:
            problems.append(f"{ec['in_chans']} channels vs {C} in the data {cfg.data.channels}")
        if img != H:
            problems.append(f"image size {img} px vs {H} px from the data (transform.size)")
        if ec["num_frames"] != T:
            problems.append(f"{ec['num_frames']} frames vs data.num_frames {T}")
        if problems:
            raise ConfigError(
                f"backbone {self.source} does not match the data config: " + "; ".join(problems)
            )


def _from_checkpoint(path: str, source: str, run_id: str | None = None) -> Backbone:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    try:
        with fs.open(f"{root}/state.json") as f:
            state = json.load(f)
        with fs.open(f"{root}/model.pt", "rb") as f:
            sd = torch.load(f, map_location="cpu")
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(
            f"{source}: not a pretraining checkpoint folder such as "
            f"<storage>/<run>/checkpoint_00000132 ({e})"
        ) from None
    if "encoder_config" not in state:
        raise ConfigError(f"{source}: the checkpoint does not record its encoder_config")
    return Backbone(
        state["encoder_config"], sd, source, run_id or state.get("run_id"), state.get("channels")
    )


def resolve_backbone(spec: str | None, tracking_uri: str, experiment: str) -> Backbone:
    """A backbone from a checkpoint folder, a ``models:/`` URI, an MLflow run id, or (None)
    the newest finished pretraining run of ``experiment``."""
    from mlflow import MlflowClient

    from sdofm.tracking import CHECKPOINT_TAG, use_tracking_uri

    if spec and spec.startswith(("models:/", "runs:/")):
        import mlflow.pytorch

        with use_tracking_uri(tracking_uri):
            enc = mlflow.pytorch.load_model(spec)
        if not isinstance(enc, MAEEncoder):
            raise ConfigError(f"{spec} is a {type(enc).__name__}, not an MAEEncoder")
        return Backbone(enc.encoder_config, enc.state_dict(), spec)
    if spec and ("/" in spec or Path(spec).exists()):
        return _from_checkpoint(spec, spec)
    client = MlflowClient(tracking_uri)
    if spec:
        try:
            run = client.get_run(spec)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"finetune.backbone {spec!r}: no such MLflow run at {tracking_uri} ({e})"
            ) from None
    else:
        exp = client.get_experiment_by_name(experiment)
        runs = (
            client.search_runs(
                [exp.experiment_id],
                filter_string="attributes.status = 'FINISHED' and tags.`sdofm.task` = 'pretrain'",
                order_by=["attributes.end_time DESC"],
                max_results=1,
            )
            if exp
            else []
        )
        if not runs:
            raise ConfigError(
                f"no finished pretraining run in MLflow experiment {experiment!r} at "
                f"{tracking_uri}: run `sdofm pretrain` first, or set finetune.backbone "
                "(a run id, a models:/ URI or a checkpoint folder)"
            )
        run = runs[0]
    ckpt = run.data.tags.get(CHECKPOINT_TAG)
    if not ckpt:
        raise ConfigError(f"MLflow run {run.info.run_id} records no checkpoint ({CHECKPOINT_TAG})")
    return _from_checkpoint(ckpt, f"run {run.info.run_id} ({ckpt})", run.info.run_id)


def build_regressor(
    cfg: Config, sample_shape: tuple[int, int, int, int], backbone: Backbone | None
) -> nn.Module:
    """The configured head on the backbone's encoder, or the from-scratch baseline CNN."""
    fc = cfg.finetune
    K = len(dimmed_channels(cfg))
    if fc.head == "baseline_cnn":
        C, T, _, _ = sample_shape
        return BaselineCNN(C, T, K, width=max(8, fc.hidden // 4))
    if backbone is None:
        raise ConfigError(f"finetune.head {fc.head!r} needs a backbone")
    return EncoderRegressor(
        backbone.encoder(), K, fc.head, fc.hidden, fc.freeze, fc.unfreeze_blocks
    )


# --------------------------------------------------------------------------- metrics


def alpha_metrics(pred: np.ndarray, true: np.ndarray, names: list[str], tol: float, prefix: str):
    """pred, true: (n, K) -> {prefix/mae, prefix/success, prefix/mae_<c>, prefix/success_<c>}."""
    err = np.abs(pred - true)
    out = {f"{prefix}/mae": float(err.mean()), f"{prefix}/success": float((err < tol).mean())}
    for k, c in enumerate(names):
        out[f"{prefix}/mae_{c}"] = float(err[:, k].mean())
        out[f"{prefix}/success_{c}"] = float((err[:, k] < tol).mean())
    return out


def scatter_figure(pred: np.ndarray, true: np.ndarray, names: list[str], title: str):
    """Predicted vs true alpha, one panel per channel, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(names)
    cols = min(K, 3)
    rows = -(-K // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= K:
            ax.axis("off")
            continue
        mae = np.abs(pred[:, k] - true[:, k]).mean()
        ax.scatter(true[:, k], pred[:, k], s=6, alpha=0.6)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{names[k]}  MAE {mae:.3f}", fontsize=9)
        ax.set_xlabel("true alpha", fontsize=8)
        ax.set_ylabel("predicted alpha", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the worker loop


def _predict(model, shard, dimming: Dimming, split: str, batch_size: int, device):
    """-> (pred (n, K), true (n, K)) over this worker's shard, gathered from every worker."""
    import torch.distributed as dist

    preds, trues = [], []
    model.eval()
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            x, alpha = dimming(batch["image"], batch["sample"], split, 0)
            preds.append(model(torch.from_numpy(x).to(device)).float().cpu().numpy())
            trues.append(alpha)
    model.train()
    K = len(dimming.channels)
    pred = np.concatenate(preds) if preds else np.zeros((0, K), np.float32)
    true = np.concatenate(trues) if trues else np.zeros((0, K), np.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (pred, true))
        pred = np.concatenate([p for p, _ in parts])
        true = np.concatenate([t for _, t in parts])
    return pred, true


def finetune_loop(config: dict) -> None:
    """The Ray Train worker function of a dimming run.

    ``config``: ``cfg``, ``sample_shape``, ``stats``, ``backbone`` (a :class:`Backbone` or
    None), ``steps_per_epoch``, ``tracking_uri``, ``run_id``, ``fallback_dir``.
    """
    import ray.train
    import ray.train.torch

    from sdofm.pretraining.loop import lr_at, quiet_reports, say, unwrap
    from sdofm.tracking import Tracker

    quiet_reports()
    cfg = Config.model_validate(config["cfg"])
    fc = cfg.finetune
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    shape = tuple(config["sample_shape"])
    dimming = Dimming(cfg, config["stats"], shape[2])
    names = [cfg.data.channels[i] for i in dimming.channels]

    model = build_regressor(cfg, shape, config["backbone"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=fc.lr, weight_decay=fc.weight_decay)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / HEAD_FILE, map_location="cpu"))
            optimizer.load_state_dict(torch.load(Path(d) / "optimizer.pt", map_location="cpu"))
            start_epoch = json.loads((Path(d) / "state.json").read_text())["epoch"]
    model = ray.train.torch.prepare_model(model)
    tracker = (
        Tracker(config["tracking_uri"], config["run_id"], config["fallback_dir"])
        if rank == 0
        else None
    )

    total = config["steps_per_epoch"] * fc.epochs
    warmup = max(1, config["steps_per_epoch"] // 10)
    step = start_epoch * config["steps_per_epoch"]
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")
    test = ray.train.get_dataset_shard("test")
    for epoch in range(start_epoch, fc.epochs):
        t0, losses, seen = time.perf_counter(), [], 0
        for batch in train.iter_batches(
            batch_size=fc.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.loader.shuffle_buffer or None,
            local_shuffle_seed=cfg.loader.seed + epoch,
        ):
            x, alpha = dimming(batch["image"], batch["sample"], "train", epoch)
            pred = model(torch.from_numpy(x).to(device))
            loss = nn.functional.mse_loss(pred.float(), torch.from_numpy(alpha).to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at epoch {epoch} step {step}: samples {batch['sample'].tolist()}"
                )
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, fc.lr, warmup, total)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.detach().item())
            seen += len(x)
            step += 1
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train/loss": float(np.mean(losses)) if losses else float("nan"),
            "train/samples_per_s": seen / (time.perf_counter() - t0),
        }
        pred, true = _predict(model, val, dimming, "val", fc.batch_size, device)
        metrics.update(alpha_metrics(pred, true, names, fc.success_tolerance, "val"))
        last = epoch + 1 == fc.epochs
        if last:
            tpred, ttrue = _predict(model, test, dimming, "test", fc.batch_size, device)
            metrics.update(alpha_metrics(tpred, ttrue, names, fc.success_tolerance, "test"))
        if rank == 0:
            say(
                f"epoch {epoch + 1}/{fc.epochs} loss {metrics['train/loss']:.4f} "
                f"val MAE {metrics['val/mae']:.4f} success {metrics['val/success']:.2f}"
            )
            tracker.log_metrics(metrics, step=epoch + 1)
            if last:
                for split, (p, t) in (("val", (pred, true)), ("test", (tpred, ttrue))):
                    fig = scatter_figure(
                        p, t, names, f"{split}: predicted vs true alpha ({fc.head})"
                    )
                    tracker.log_figure(fig, f"scatter_{split}.png")
        # The MLflow run id travels with the results (a sweep's table, its best model).
        metrics["mlflow_run_id"] = config["run_id"] or ""
        with _EpochCheckpoint(rank, unwrap(model), optimizer, epoch + 1) as ckpt:
            ray.train.report(
                metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{epoch + 1:04d}"
            )


class _EpochCheckpoint:
    """Rank 0's checkpoint of a finished epoch (None on other ranks), in a temporary folder."""

    def __init__(self, rank: int, model: nn.Module, optimizer, epoch: int):
        import tempfile

        self.tmp = tempfile.TemporaryDirectory() if rank == 0 else None
        self.args = (model, optimizer, epoch)

    def __enter__(self):
        import ray.train

        if self.tmp is None:
            return None
        model, optimizer, epoch = self.args
        d = Path(self.tmp.name)
        torch.save(model.state_dict(), d / HEAD_FILE)
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        (d / "state.json").write_text(json.dumps({"epoch": epoch}))
        return ray.train.Checkpoint.from_directory(d)

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


# --------------------------------------------------------------------------- the driver


@dataclass
class Prepared:
    """What every run of one data config shares: statistics, backbone, materialised splits."""

    sample_shape: tuple[int, int, int, int]
    stats: dict | None
    backbone: Backbone | None
    datasets: dict
    counts: dict[str, int]
    tracking_uri: str
    extra_params: dict = field(default_factory=dict)


def prepare(cfg: Config) -> Prepared:
    """Index, statistics, backbone and the three splits in physical units, materialised once
    (small finetuning sets; trials of a sweep share them through the object store)."""
    from sdofm.datasets.index import load_or_build_index
    from sdofm.datasets.pipeline import SDOMLPipeline
    from sdofm.datasets.stats import load_or_compute_stats
    from sdofm.runtime import init_ray
    from sdofm.tracking import tracking_uri

    init_ray(log_to_driver=True, dashboard=True)
    dimmed_channels(cfg)  # fail early without AIA channels
    table, _ = load_or_build_index(cfg.data)
    stats = (
        load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
        if cfg.transform.zscore
        else None
    )
    physical = physical_transform(cfg.transform, cfg.data.channels)
    pipe = SDOMLPipeline(cfg.data, physical, cfg.loader, table)
    shape = pipe.sample_shape()
    uri = tracking_uri(cfg.tracking.uri)
    backbone = None
    if cfg.finetune.head != "baseline_cnn":
        backbone = resolve_backbone(cfg.finetune.backbone, uri, cfg.tracking.experiment)
        backbone.check(cfg, shape)
    datasets, counts = {}, {}
    for split in ("train", "val", "test"):
        n = pipe.num_samples(split)
        if n == 0:
            raise ConfigError(f"the {split} split of {cfg.data.root} is empty: check data.split")
        subset = None
        limit = cfg.finetune.max_train_samples
        if split == "train" and limit and limit < n:
            subset = np.sort(np.random.default_rng(cfg.finetune.dim_seed).permutation(n)[:limit])
            n = limit
        datasets[split] = pipe.dataset(split, epoch=0, subset=subset).materialize()
        counts[split] = n
    return Prepared(shape, stats, backbone, datasets, counts, uri)


@dataclass
class FinetuneResult:
    run_id: str | None
    metrics: dict
    checkpoint: str | None
    model_uri: str | None = None


def train_head(
    cfg: Config,
    prepared: Prepared,
    run_id: str | None,
    name: str,
    storage: str,
    callbacks: list | None = None,
) -> FinetuneResult:
    """One Ray Train run of the configured head on the prepared splits."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from sdofm.runtime import resolve_use_gpu
    from sdofm.tracking import fallback_dir

    sc, fc = cfg.scaling, cfg.finetune
    per_worker = prepared.counts["train"] // sc.num_workers
    steps = -(-per_worker // fc.batch_size)
    use_gpu = resolve_use_gpu(cfg)
    fallback = fallback_dir(storage, name)
    trainer = TorchTrainer(
        finetune_loop,
        train_loop_config={
            "cfg": dump_config(cfg),
            "sample_shape": list(prepared.sample_shape),
            "stats": prepared.stats,
            "backbone": prepared.backbone,
            "steps_per_epoch": steps,
            "tracking_uri": prepared.tracking_uri,
            "run_id": run_id,
            "fallback_dir": str(fallback),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=sc.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
        datasets=prepared.datasets,
    )
    result = trainer.fit()
    return FinetuneResult(
        run_id, dict(result.metrics or {}), result.checkpoint.path if result.checkpoint else None
    )


def run_params(cfg: Config, prepared: Prepared) -> dict:
    from sdofm.tracking import flatten

    b = prepared.backbone
    return {
        **flatten(dump_config(cfg)),
        "derived.sample_shape": list(prepared.sample_shape),
        "derived.backbone": b.source if b else "none (from scratch)",
        **{f"derived.{k}_samples": v for k, v in prepared.counts.items()},
    }


def load_regressor(cfg: Config, prepared: Prepared, checkpoint: str) -> nn.Module:
    """The trained regressor of a finished run's checkpoint."""
    model = build_regressor(cfg, prepared.sample_shape, prepared.backbone)
    model.load_state_dict(torch.load(Path(checkpoint) / HEAD_FILE, map_location="cpu"))
    return model.eval()


def finetune(cfg: Config) -> FinetuneResult:
    """Train the dimming head once, logged to MLflow as one run tagged with its backbone."""
    from sdofm import tracking
    from sdofm.pretraining.run import storage_path

    prepared = prepare(cfg)
    storage = storage_path(cfg)
    b = prepared.backbone
    run_id = tracking.start_run(
        prepared.tracking_uri,
        cfg.finetune.experiment,
        cfg.finetune.run_name,
        storage,
        run_params(cfg, prepared),
        tags={
            "sdofm.task": "finetune-dimming",
            "sdofm.head": cfg.finetune.head,
            "sdofm.backbone_run_id": (b.run_id or "") if b else "",
            "sdofm.backbone": b.source if b else "none",
        },
    )
    try:
        result = train_head(cfg, prepared, run_id, cfg.finetune.run_name, storage)
    except BaseException:
        tracking.end_run(prepared.tracking_uri, run_id, "FAILED")
        raise
    if run_id is not None and result.checkpoint and "://" not in result.checkpoint:
        model = load_regressor(cfg, prepared, result.checkpoint)
        example = np.zeros((1, *prepared.sample_shape), np.float32)
        result.model_uri = tracking.log_model(
            prepared.tracking_uri, run_id, model, example, "regressor"
        )
    tracking.end_run(prepared.tracking_uri, run_id, "FINISHED")
    return result

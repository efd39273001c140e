"""The scoreboard's generation section: a generative backbone's EMA generator against the
held-out frames, every metric calibrated (``sdofm.generation.calibration``).

Two generators are scored on the same splits: the pretrained one (``pretrained``) and the
same architecture with random weights (``random_init``, seeded as the heads' random-init
arm), so that the board says for each calibrated metric whether training helped and where
the trained generator ends relative to the floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sdofm.config import Config, ConfigError
from sdofm.datasets.inputs import build_inputs
from sdofm.finetuning.backbone import Backbone, resolve_backbone
from sdofm.generation import CORRUPTIONS, Calibrator, applicable, summarise, summary_rows
from sdofm.generation.calibration import Calibration
from sdofm.models import FEATURE_FAMILY, family_of
from sdofm.pretraining.objective import scoring_objective

ARMS = ("pretrained", "random_init")


@dataclass
class GenerationSection:
    calibration: Calibration
    rows: list[dict]
    """One per metric (``summary_rows``): floor, corruptions separated, both arms."""
    frames: int
    """Held-out real frames (each split compares two halves of them)."""
    notes: list[str] = field(default_factory=list)
    """What was left out, and why (a feature space without an encoder, say)."""


def real_frames(pipe, split: str, limit: int | None, batch_size: int) -> np.ndarray:
    """-> (N, C, H, W) the last time step of ``split``'s samples in sample order (the first
    ``limit`` read when given), in model units."""
    ids, parts, n = [], [], 0
    with pipe.frame_errors():
        for batch in pipe.dataset(split, epoch=0).iter_batches(
            batch_size=batch_size, batch_format="numpy"
        ):
            parts.append(np.asarray(batch["image"][:, :, -1], dtype=np.float32))
            ids.append(batch["sample"])
            n += len(parts[-1])
            if limit is not None and n >= limit:
                break
    if not parts:
        return np.zeros((0,), np.float32)
    order = np.argsort(np.concatenate(ids), kind="stable")
    return np.concatenate(parts)[order][:limit]


COPY_NOISE = 0.02
"""The memorisation control: training frames with white noise of this fraction of each
channel's standard deviation (copies a generator might make)."""


def near_copies(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    std = frames.std(axis=(0, 2, 3), keepdims=True)
    return frames + COPY_NOISE * std * rng.standard_normal(frames.shape).astype(frames.dtype)


def feature_encoder(
    cfg: Config, uri: str, sample_shape: tuple
) -> tuple[torch.nn.Module | None, str]:
    """-> (the MAE encoder of the learned feature space or None, where it came from or why
    there is none)."""
    gc, options = cfg.generation, cfg.train.storage_options
    if gc.feature_backbone:
        backbone = resolve_backbone(gc.feature_backbone, uri, cfg.tracking.experiment, options)
        if backbone.family != FEATURE_FAMILY:
            raise ConfigError(
                f"generation.feature_backbone {gc.feature_backbone!r} is a {backbone.family} "
                f"backbone: the feature space needs an {FEATURE_FAMILY} encoder"
            )
        backbone.check(cfg, sample_shape[:1] + (1,) + sample_shape[2:])
        return backbone.encoder(), backbone.source
    backbone = _newest_fitting_mae(cfg, uri, sample_shape)
    if backbone is None:
        return None, (
            f"no finished {FEATURE_FAMILY} pretraining run of experiment "
            f"{cfg.tracking.experiment!r} fits this data (one frame of {sample_shape[0]} "
            f"channels at {sample_shape[-1]} px): pretrain one or set generation.feature_backbone"
        )
    return backbone.encoder(), backbone.source


def _newest_fitting_mae(cfg: Config, uri: str, sample_shape: tuple) -> Backbone | None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED' and tags.`sdofm.task` = 'pretrain'",
        order_by=["attributes.end_time DESC"],
        max_results=50,
    )
    shape = sample_shape[:1] + (1,) + sample_shape[2:]
    for run in runs:
        name = run.data.tags.get("sdofm.model", "")
        try:
            if family_of(name) != FEATURE_FAMILY:
                continue
            backbone = resolve_backbone(
                run.info.run_id, uri, cfg.tracking.experiment, cfg.train.storage_options
            )
            backbone.check(cfg, shape)
            return backbone
        except (ConfigError, KeyError, ValueError):
            continue
    return None


def generation_section(cfg: Config, backbone: Backbone, uri: str) -> GenerationSection:
    """Score the backbone's generator and its random-init twin against the test split."""
    gc = cfg.generation
    transform = cfg.transform.model_copy(update={"on": "reader"})
    pipe = build_inputs(cfg, transform=transform).pipeline
    shape = pipe.sample_shape()
    backbone.check(cfg, shape)
    if backbone.model is None:
        raise ConfigError(
            f"the backbone {backbone.source} holds its encoder only: give its pretraining "
            "run id or checkpoint folder to score its generator"
        )
    batch = cfg.finetune.batch_size
    real = real_frames(pipe, "test", None, batch)
    if len(real) < 8:
        raise ConfigError(
            f"the test split of {cfg.data.root} holds {len(real)} frames: scoring a generator "
            "needs at least 8 (check data.split)"
        )
    train = real_frames(pipe, "train", gc.train_frames, batch)
    channels = list(cfg.data.channels)
    encoder, source = feature_encoder(cfg, uri, shape)
    notes = [
        f"encoder features: {source}" if encoder is not None else f"no encoder space: {source}"
    ]

    def summary(frames: np.ndarray):
        return summarise(frames, channels, encoder)

    rng = np.random.default_rng(gc.seed)
    real_summary = summary(real)
    corrupted = {
        name: summary(CORRUPTIONS[name](real, channels, rng)) for name in applicable(channels)
    }
    skipped = sorted(set(CORRUPTIONS) - set(corrupted))
    if skipped:
        notes.append(f"corruptions not applicable to channels {channels}: {', '.join(skipped)}")
    if len(train) >= len(real) // 2:
        train_summary, copies = summary(train), summary(near_copies(train, rng))
    else:
        train_summary = copies = None
        notes.append(
            f"memorisation not checked: {len(train)} training frames, fewer than the "
            f"{len(real) // 2} of a half"
        )
    name, kwargs = backbone.model
    objective = scoring_objective(backbone.family, name, kwargs, channels, cfg.train.seed)
    pretrained = objective.build_model()
    pretrained.load_state_dict(backbone.state_dict)
    window = objective.seam_window(pretrained)
    cal = Calibrator(real_summary, gc.splits, gc.seed, window, train_summary)
    calibration = cal.calibrate(corrupted, copies)
    torch.manual_seed(cfg.train.seed)
    models = {"pretrained": pretrained, "random_init": objective.build_model()}
    for arm, model in models.items():
        g = torch.Generator().manual_seed(gc.seed)  # the same latents for both arms
        frames = objective.generate(model, len(real), g)[:, :, -1].numpy()
        if not np.isfinite(frames).all():
            raise ValueError(f"the {arm} generator of {backbone.source} drew NaN or inf pixels")
        cal.add_arm(calibration, arm, summary(frames))
    rows = summary_rows(calibration, ARMS, baseline="random_init")
    return GenerationSection(calibration, rows, len(real), notes)


def gap_closed(row: dict) -> float:
    """How much of the random-init generator's distance to the floor training closed: 0 no
    better than random weights, 1 at the floor (real vs real), above 1 past it."""
    gap = row["random_init"] - row["floor"]
    return (row["random_init"] - row["pretrained"]) / gap if gap != 0 else float("nan")


def format_section(section: GenerationSection) -> str:
    """The generation section as a plain-text table."""
    cal = section.calibration
    splits = len(next(iter(cal.floor.values())))

    def cell(v: np.ndarray | float, lo_hi=None) -> str:
        if lo_hi is None:
            v, lo_hi = float(np.mean(v)), (float(np.min(v)), float(np.max(v)))
        return f"{v:.4g} [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]"

    head = ["metric", "floor (real vs real)", *ARMS, "trained better", "gap closed", "separates"]
    lines = [
        [
            f"{r['metric']} ({'up' if r['higher_is_better'] else 'down'})",
            cell(r["floor"], r["floor_range"]),
            *(cell(r[a], r[f"{a}_range"]) for a in ARMS),
            "yes" if r["pretrained_improves"] else "NO",
            f"{gap_closed(r):.2f}",
            ", ".join(r["separates"]) if r["calibrated"] else "nothing: NOT USED",
        ]
        for r in section.rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]

    def join(cells):
        return "  ".join(x.ljust(w) for x, w in zip(cells, widths, strict=True)).rstrip()

    used = [r for r in section.rows if r["calibrated"]]
    better = sum(r["pretrained_improves"] for r in used)
    out = [
        f"-- generation: G_ema's frames against {section.frames} held-out frames; each value "
        f"compares {section.frames // 2} real frames with as many others, mean [min, max] "
        f"over {splits} random halvings of the real frames --",
        join(head),
        *(join(x) for x in lines),
        f"calibrated metrics: {len(used)} of {len(section.rows)}; the trained generator beats "
        f"its random-init twin on {better} of them (on every split)",
    ]
    mem = cal.memorisation
    if mem:
        parts = [f"floor {cell(mem['floor'])}"]
        if "copies" in mem:
            caught = "caught" if cal.memorises("copies") else "MISSED"
            parts.append(f"near copies of training frames {cell(mem['copies'])} ({caught})")
        for arm in ARMS:
            flag = " MEMORISES" if cal.memorises(arm) else ""
            parts.append(f"{arm} {cell(mem[arm])}{flag}")
        out.append(
            "memorisation (median distance to the nearest training frame over that of "
            "held-out frames, random-CNN space): " + "; ".join(parts)
        )
    out.append(
        "(a metric separates a corruption, and the trained generator is better, only on "
        "every split; gap closed: 0 = no better than random weights, 1 = at the floor)"
    )
    return "\n".join(out + section.notes)

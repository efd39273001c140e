"""``sdofm evaluate``: every head scored on the fixed test split against two controls.

For each task the same head is trained in three arms on the same data and settings, each
``finetune.head_seeds`` times (seeds ``train.seed``, ``train.seed + 1``, ...):

- ``pretrained``: on the backbone (``finetune.backbone``);
- ``random_init``: on the same encoder architecture with random weights, which isolates
  what pretraining adds from what the architecture and finetuning add;
- ``from_scratch``: the task's from-scratch baseline (``finetune.head=baseline_cnn``).

Each trained head predicts every test sample once, through the task's own evaluation code:
its per-sample scores and metrics are those of the engine's ``test/...`` metrics in MLflow,
with the same thresholds from the config (``Task.test_scores``, ``Task.summarise``). The
board's metrics pool every seed; their 95 % intervals come from a bootstrap that resamples
whole test days (a day's samples share their Sun) and each arm's seeds, so they carry
both the day-to-day and the seed-to-seed variance (with fewer than ``MIN_DAYS`` test days
it resamples samples, and the board says that its intervals are too narrow). The
comparison is paired: each resample draws the same days for all three arms, and "beats"
means the 95 % interval of the difference lies on the better side of zero.

The backbone itself is scored too, in its own section: its pretraining objective's
reconstruction term per channel on the test split (the MAE's squared error on masked
patches in z-scored units, the NVAE's Gaussian NLL), against the same whole model with
random weights on the same masks or posterior draws. There is no from-scratch arm there.
A generative backbone (StyleSwin) reconstructs nothing; its EMA generator is scored instead,
against the held-out frames, every metric calibrated against the real frames' own noise
floor and deliberate corruptions (``sdofm.finetuning.generation``). A forecasting backbone's
forecasts are scored against persistence and differential rotation per channel and lead,
with intervals over test days (``sdofm.finetuning.forecasting``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field

import numpy as np

from sdofm.config import Config, ConfigError, dump_config
from sdofm.datasets.inputs import build_inputs
from sdofm.datasets.skill import BASELINES, DAY_NS, MIN_DAYS
from sdofm.engine import storage_path
from sdofm.finetuning.backbone import Backbone, resolve_backbone
from sdofm.finetuning.forecasting import ForecastSection, forecast_section, format_forecast
from sdofm.finetuning.generation import ARMS as GENERATION_ARMS
from sdofm.finetuning.generation import GenerationSection, format_section, generation_section
from sdofm.finetuning.run import load_head, prepare, train_head
from sdofm.finetuning.tasks import TASK_NAMES, get_task
from sdofm.models import encoder_class
from sdofm.pretraining.objective import objective_class, scoring_objective
from sdofm.tracking import log_metrics, log_text, tracked_run, tracking_uri

ARMS = ("pretrained", "random_init", "from_scratch")
CONTROLS = ARMS[1:]
RECONSTRUCTION = "reconstruction"
"""The board's section (its ``task``) of the backbone's own masked-reconstruction error."""
GENERATION = "generation"
"""The board's section of a generative backbone's samples (``sdofm.finetuning.generation``)."""
BACKBONE = "backbone"
"""The board's key, among the sections not scored, for all of the backbone's own sections."""


@dataclass
class Board:
    rows: list[dict] = field(default_factory=list)
    """One per (task, metric): value and interval of each arm, and the verdicts."""
    skipped: dict[str, str] = field(default_factory=dict)
    """task -> why it was not scored with this config."""
    run_id: str | None = None
    n_boot: int = 0
    generation: GenerationSection | None = None
    """A generative backbone's generator against held-out frames, calibrated."""
    forecast: ForecastSection | None = None
    """A forecasting backbone's forecasts against persistence and rotation."""
    resampled: dict[str, str] = field(default_factory=dict)
    """task -> what its intervals resample (``24 test days x 3 head seeds``)."""


def random_init(backbone: Backbone, seed: int) -> Backbone:
    """The backbone's encoder architecture with freshly initialised weights."""
    import torch

    torch.manual_seed(seed)
    enc = encoder_class(backbone.family)(**backbone.encoder_config)
    return dataclasses.replace(
        backbone,
        state_dict=enc.state_dict(),
        source=f"random init (architecture of {backbone.source})",
        run_id=None,
    )


def test_days(dataset) -> np.ndarray:
    """(n,) the UTC day (days since 1970) of each sample of ``dataset`` (its last frame),
    rows in sample order as the heads' test scores."""
    ids, days = [], []
    for b in dataset.select_columns(["sample", "time"]).iter_batches(
        batch_size=4096, batch_format="numpy"
    ):
        ids.append(np.asarray(b["sample"]))
        days.append(np.asarray(b["time"], np.int64)[:, -1] // DAY_NS)
    if not ids:
        return np.zeros(0, np.int64)
    return np.concatenate(days)[np.argsort(np.concatenate(ids), kind="stable")]


def _resampled(days: np.ndarray, seeds: int) -> str:
    n_days = len(np.unique(days))
    if resampled_unit(days) == "days":
        what = f"{n_days} test days"
    else:
        what = (
            f"{len(days)} test samples (only {n_days} test day{'s' if n_days != 1 else ''}, "
            f"fewer than {MIN_DAYS}: samples of one day are not independent, so these "
            "intervals are too narrow; use an archive with more test days)"
        )
    return what + (f" x {seeds} head seeds" if seeds > 1 else "")


def resampled_unit(days: np.ndarray | None) -> str:
    """What the bootstrap resamples for samples of ``days``: ``days`` or ``samples``."""
    return "days" if days is not None and len(np.unique(days)) >= MIN_DAYS else "samples"


def bootstrap(
    summarise, scores: dict, n_boot: int, seed: int, days: np.ndarray | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """-> (point estimates, resampled estimates) per arm and metric.

    ``scores``: arm -> per-sample arrays, or a list of them, one per head seed, with the
    same rows (test samples in sample order) for every arm and seed. ``days``: (n,) each
    row's day. Each resample draws whole days with replacement (samples, with fewer than
    :data:`MIN_DAYS` days), the same for every arm (paired), and each arm's seeds with
    replacement; a metric is ``summarise`` of the drawn rows of every drawn seed, stacked.
    The point estimate stacks every row of every seed.
    """
    runs = {arm: s if isinstance(s, list) else [s] for arm, s in scores.items()}
    n = {len(v) for rs in runs.values() for r in rs for v in r.values()}
    if len(n) != 1:
        raise ValueError(f"the arms scored different numbers of test samples: {sorted(n)}")
    (n,) = n
    blocks = None
    if resampled_unit(days) == "days":
        blocks = [np.flatnonzero(days == d) for d in np.unique(days)]

    def stack(chosen: list[dict], rows) -> dict[str, np.ndarray]:
        if len(chosen) == 1:
            return {k: a[rows] for k, a in chosen[0].items()}
        return {k: np.concatenate([r[k][rows] for r in chosen]) for k in chosen[0]}

    rng = np.random.default_rng(seed)
    point = {arm: summarise(stack(rs, slice(None))) for arm, rs in runs.items()}
    draws = {arm: {m: np.empty(n_boot) for m in point[arm]} for arm in runs}
    for b in range(n_boot):
        if blocks is None:
            rows = rng.integers(0, n, n)
        else:
            rows = np.concatenate([blocks[i] for i in rng.integers(0, len(blocks), len(blocks))])
        for arm, rs in runs.items():
            chosen = rs if len(rs) == 1 else [rs[i] for i in rng.integers(0, len(rs), len(rs))]
            for m, v in summarise(stack(chosen, rows)).items():
                draws[arm][m][b] = v
    return point, draws


def reconstruction_scores(cfg: Config, backbone: Backbone) -> tuple[str, dict, np.ndarray]:
    """-> (score name, arm -> {"sums": (n, C), "weight": (n,)}, each row's day (n,)): the
    reconstruction term of every test sample and channel (``BackboneObjective.sample_errors``), in the pretraining
    transform, rows in sample order, for the whole pretrained model and for the same
    architecture with random weights (seeded as :func:`random_init`, so its encoder is that
    arm's encoder), both on the same masks or posterior draws."""
    import torch

    d = cfg.data
    transform = cfg.transform.model_copy(update={"on": "reader"})
    pipe = build_inputs(cfg, transform=transform).pipeline
    backbone.check(cfg, pipe.sample_shape())
    if pipe.num_samples("test") == 0:
        raise ConfigError(f"the test split of {d.root} is empty: check data.split")
    name, kwargs = backbone.model
    objective = scoring_objective(backbone.family, name, kwargs, d.channels, cfg.train.seed)
    pretrained = objective.build_model()
    pretrained.load_state_dict(backbone.state_dict)
    torch.manual_seed(cfg.train.seed)
    models = {"pretrained": pretrained.eval(), "random_init": objective.build_model().eval()}
    parts: dict[str, list] = {arm: [] for arm in models}
    ids, days = [], []
    with pipe.frame_errors():
        batches = pipe.dataset("test", epoch=0).iter_batches(
            batch_size=cfg.finetune.batch_size, batch_format="numpy"
        )
        for batch in batches:
            imgs = torch.tensor(batch["image"], dtype=torch.float32)
            for arm, model in models.items():
                sums, weight = objective.sample_errors(model, imgs, batch["sample"])
                parts[arm].append((sums.double().numpy(), weight.double().numpy()))
            ids.append(batch["sample"])
            days.append(np.asarray(batch["time"], np.int64)[:, -1] // DAY_NS)
    order = np.argsort(np.concatenate(ids))
    scores = {
        arm: {
            "sums": np.concatenate([s for s, _ in p])[order],
            "weight": np.concatenate([w for _, w in p])[order],
        }
        for arm, p in parts.items()
    }
    return objective.score_name, scores, np.concatenate(days)[order]


def reconstruction_summary(scores: dict[str, np.ndarray], channels, score: str) -> dict:
    """Each channel's error over (a resample of) the test samples, and their mean (the
    pretraining loss)."""
    per_channel = scores["sums"].sum(0) / scores["weight"].sum()
    out = {f"{score}_{c}": float(v) for c, v in zip(channels, per_channel, strict=True)}
    out[f"{score}_mean"] = float(per_channel.mean())
    return out


def board_rows(task, point, draws, metrics) -> list[dict]:
    """Rows of the board for one task: each arm's value and 95 % interval, and whether the
    pretrained arm beats each control (the paired difference's interval excludes zero)."""
    rows = []
    for metric, higher in metrics:
        row = {"task": task, "metric": metric, "higher_is_better": higher}
        for arm in point:
            lo, hi = np.percentile(draws[arm][metric], [2.5, 97.5])
            row[arm] = point[arm][metric]
            row[f"{arm}_ci"] = (float(lo), float(hi))
        for control in CONTROLS:
            if control not in point or "pretrained" not in point:
                continue
            gain = draws["pretrained"][metric] - draws[control][metric]
            gain = gain if higher else -gain
            lo, hi = np.percentile(gain, [2.5, 97.5])
            row[f"gain_vs_{control}_ci"] = (float(lo), float(hi))
            row[f"beats_{control}"] = bool(lo > 0)
        rows.append(row)
    return rows


def format_board(board: Board) -> str:
    """The board as a plain-text table (printed and logged to MLflow)."""

    def cell(row, arm):
        if arm not in row:
            return "n/a"
        lo, hi = row[f"{arm}_ci"]
        return f"{row[arm]:.4f} [{lo:.4f}, {hi:.4f}]"

    def verdict(row, control):
        if f"beats_{control}" not in row:
            return "n/a"
        return "yes" if row[f"beats_{control}"] else "NO"

    head = ["task", "metric", *ARMS, "beats random", "beats scratch"]
    lines = []
    for r in board.rows:
        arrow = "up" if r["higher_is_better"] else "down"
        lines.append(
            [
                r["task"],
                f"{r['metric']} ({arrow})",
                *(cell(r, a) for a in ARMS),
                *(verdict(r, c) for c in CONTROLS),
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]

    def join(cells):
        return "  ".join(x.ljust(w) for x, w in zip(cells, widths, strict=True)).rstrip()

    out = [join(head)] if board.rows else []
    section = False
    for r, line in zip(board.rows, lines, strict=True):
        if r["task"] == RECONSTRUCTION and not section:
            section = True
            out.append(
                "-- reconstruction: the backbone itself on the test split, its pretraining "
                "loss per channel (MAE: masked patches), pretrained vs the same model with "
                "random weights on the same masks or draws --"
            )
        out.append(join(line))
    if board.rows:
        over = "; ".join(f"{t}: {what}" for t, what in board.resampled.items())
        out.append(
            f"(95 % bootstrap intervals, {board.n_boot} paired resamples of {over}; "
            "'beats': the interval of the pretrained arm's gain lies above zero)"
        )
    if board.generation is not None:
        out.append(format_section(board.generation))
    if board.forecast is not None:
        out.append(format_forecast(board.forecast))
    out += [f"{t}: not scored ({why})" for t, why in board.skipped.items()]
    return "\n".join(out)


def backbone_sections(cfg: Config, board: Board, uri: str, options, n_boot: int) -> None:
    """The backbone's own scores on ``board``: its reconstructions against its random-init
    twin, its generator's frames, or its forecasts, as its pretraining objective allows."""
    backbone = resolve_backbone(cfg.finetune.backbone, uri, cfg.tracking.experiment, options)
    scorer = objective_class(backbone.family)
    if backbone.model is None:
        board.skipped[RECONSTRUCTION if scorer.reconstructs else GENERATION] = (
            f"the backbone {backbone.source} holds its encoder only (a models:/ URI or an "
            "older checkpoint): give its pretraining run id or checkpoint folder"
        )
    elif not scorer.reconstructs:
        board.skipped[RECONSTRUCTION] = (
            f"a {backbone.family} backbone reconstructs no input (its pretraining "
            "objective scores no per-sample reconstruction)"
            + ("; its generator is scored below" if scorer.generates else "")
            + ("; its forecasts are scored below" if scorer.forecasts else "")
        )
    else:
        score, scores, days = reconstruction_scores(cfg, backbone)
        channels = cfg.data.channels
        board.resampled[RECONSTRUCTION] = _resampled(days, 1)
        point, draws = bootstrap(
            lambda s: reconstruction_summary(s, channels, score),
            scores,
            n_boot,
            cfg.train.seed,
            days,
        )
        metrics = [(f"{score}_{c}", False) for c in [*channels, "mean"]]
        board.rows += board_rows(RECONSTRUCTION, point, draws, metrics)
    if scorer.generates and backbone.model is not None:
        board.generation = generation_section(cfg, backbone, uri)
    if scorer.forecasts and backbone.model is not None:
        board.forecast = forecast_section(cfg, backbone, n_boot)


def evaluate(
    cfg: Config, task_names: list[str] | None = None, n_boot: int = 1000, heads_only: bool = False
) -> Board:
    """Score every task's head (pretrained, random-init and from-scratch arms) on the test
    split, then the backbone's own scores (:func:`backbone_sections`; not with
    ``heads_only``); one MLflow parent run holds the board, one child run per arm and head
    seed."""
    if cfg.finetune.head == "baseline_cnn":
        raise ConfigError(
            "sdofm evaluate trains the baseline itself: set finetune.head to an encoder head "
            "(pool, conv or linear), not baseline_cnn"
        )
    uri = tracking_uri(cfg.tracking.uri)
    storage = storage_path(cfg.train.storage_path)
    options = cfg.train.storage_options
    name = f"evaluate-{dt.datetime.now():%Y%m%d-%H%M%S}"
    tasks = list(TASK_NAMES if task_names is None else task_names)
    board = Board(n_boot=n_boot)
    params = {
        "tasks": ",".join(tasks),
        "backbone": cfg.finetune.backbone or "newest pretraining run",
        "bootstrap": n_boot,
        **{f"finetune.{k}": v for k, v in dump_config(cfg.finetune).items()},
    }
    with tracked_run(
        uri,
        cfg.finetune.experiment,
        name,
        storage,
        params,
        {"sdofm.task": "evaluate"},
        options,
        dump_config(cfg),
    ) as parent:
        for task_name in tasks:
            task = get_task(task_name)
            try:
                task.check(cfg)
            except ConfigError as e:
                board.skipped[task_name] = str(e)
                continue
            prepared = prepare(cfg, task)
            scores: dict[str, list] = {arm: [] for arm in ARMS}
            seeds = range(cfg.train.seed, cfg.train.seed + cfg.finetune.head_seeds)
            for k, seed in enumerate(seeds):
                seeded = cfg.model_copy(
                    update={"train": cfg.train.model_copy(update={"seed": seed})}
                )
                scratch_cfg = seeded.model_copy(
                    update={"finetune": cfg.finetune.model_copy(update={"head": "baseline_cnn"})}
                )
                arms = {
                    "pretrained": (seeded, prepared),
                    "random_init": (
                        seeded,
                        dataclasses.replace(
                            prepared, backbone=random_init(prepared.backbone, seed)
                        ),
                    ),
                    "from_scratch": (scratch_cfg, dataclasses.replace(prepared, backbone=None)),
                }
                for arm, (arm_cfg, arm_prep) in arms.items():
                    several = cfg.finetune.head_seeds > 1
                    run_name = f"{name}-{task_name}-{arm}" + (f"-seed{k}" if several else "")
                    b = arm_prep.backbone
                    arm_params = {
                        "arm": arm,
                        "head": arm_cfg.finetune.head,
                        "backbone": b.source if b else "none",
                        "head_seed": seed,
                    }
                    arm_tags = {
                        "mlflow.parentRunId": parent.run_id or "",
                        "sdofm.task": f"evaluate-{task_name}",
                        "sdofm.arm": arm,
                    }
                    with tracked_run(
                        uri,
                        cfg.finetune.experiment,
                        run_name,
                        storage,
                        arm_params,
                        arm_tags,
                        options,
                    ) as child:
                        fitted = train_head(
                            arm_cfg,
                            task,
                            arm_prep,
                            child.run_id,
                            run_name,
                            storage,
                            label=f"{task_name} {arm}"
                            + (f" seed {k + 1}/{len(seeds)}" if several else ""),
                        )
                        model = load_head(arm_cfg, task, arm_prep, fitted.checkpoint)
                        scores[arm].append(task.test_scores(arm_cfg, arm_prep, model))
            days = test_days(prepared.datasets["test"])
            board.resampled[task_name] = _resampled(days, cfg.finetune.head_seeds)
            point, draws = bootstrap(
                lambda s, t=task: t.summarise(cfg, s), scores, n_boot, cfg.train.seed, days
            )
            board.rows += board_rows(task_name, point, draws, task.board(cfg))
        if heads_only:
            board.skipped[BACKBONE] = "only the heads asked for"
        else:
            backbone_sections(cfg, board, uri, options, n_boot)
        board.run_id = parent.run_id
        text = format_board(board)
        log_text(uri, parent.run_id, text, "scoreboard.txt")
        log_text(uri, parent.run_id, json.dumps(board.rows, indent=2), "scoreboard.json")
        metrics = {
            f"{r['task']}/{arm}/{r['metric']}": r[arm]
            for r in board.rows
            for arm in ARMS
            if arm in r
        }
        if board.generation is not None:
            for r in board.generation.rows:
                for arm in ("floor", *GENERATION_ARMS):
                    metrics[f"{GENERATION}/{arm}/{r['metric']}"] = r[arm]
            log_text(
                uri,
                parent.run_id,
                json.dumps(board.generation.rows, indent=2),
                "generation.json",
            )
        if board.forecast is not None:
            for r in board.forecast.rows:
                for b in BASELINES:
                    key = f"forecast/skill_{b}_{r['channel']}_{r['lead']}"
                    metrics[key] = r[f"skill_{b}"]
            log_text(uri, parent.run_id, json.dumps(board.forecast.rows, indent=2), "forecast.json")
        log_metrics(uri, parent.run_id, metrics)
    return board

"""``sdofm finetune``, ``tune``, ``evaluate`` and ``embed``: what is done with a pretrained
backbone."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from sdofm.cli.common import (
    Args,
    console,
    friendly_errors,
    load_args,
    print_run_skipped,
    progress,
    start_ray,
    where_logs,
)

Backbone = Annotated[
    str | None,
    typer.Option(
        help="Pretrained encoder: an MLflow run id, a models:/ URI or a checkpoint folder "
        "(default: the newest finished run of the pretraining experiment).",
        show_default=False,
    ),
]


def _task_help() -> str:
    from sdofm.finetuning.tasks import TASK_NAMES

    return f"The finetuning task: {', '.join(TASK_NAMES)}."


Task = Annotated[str, typer.Argument(help=_task_help(), show_default=False)]


def _check_task(name: str, cfg) -> None:
    """An unknown task, or a config the task cannot serve, is refused before Ray starts."""
    from sdofm.finetuning.tasks import get_task

    get_task(name).check(cfg)


def _with_backbone(args: list[str] | None, backbone: str | None) -> list[str]:
    return [*(args or []), f"finetune.backbone={backbone}"] if backbone else list(args or [])


def _metrics_table(title: str, metrics: dict, targets: list[str], columns: tuple) -> Table:
    keys = [f"{split}/{col}" for split in ("val", "test") for col in columns]
    table = Table("target", *(k.replace("/", " ") for k in keys), title=title)
    for c in ["", *targets]:
        suffix = f"_{c}" if c else ""
        table.add_row(
            c or "mean",
            *(f"{metrics[k + suffix]:.4f}" if k + suffix in metrics else "-" for k in keys),
        )
    return table


def run_finetune(cfg, task_name: str):
    from sdofm.finetuning.run import finetune
    from sdofm.finetuning.tasks import get_task

    task = get_task(task_name)
    result = finetune(cfg, task.name)
    title = f"{task.name} head {cfg.finetune.head!r}"
    console.print(_metrics_table(title, result.metrics, task.targets(cfg), task.columns))
    m = result.metrics
    for k in task.extra:
        console.print(
            f"{k}: "
            + "   ".join(f"{s} {m[f'{s}/{k}']:.4f}" for s in ("val", "test") if f"{s}/{k}" in m)
        )
    console.print(
        f"MLflow run id: {result.run_id}   model: {result.model_uri}   checkpoint: {result.checkpoint}"
    )
    print_run_skipped(result.skipped, result.run_id)
    return result


def finetune_cmd(task: Task, args: Args = None, backbone: Backbone = None) -> None:
    """Train a science head on a pretrained backbone (one Ray Train run).

    dimming: AIA autocalibration, predict each AIA channel's dimming factor alpha.
    eve: virtual EVE, the MEGS-A line irradiances (data.eve_lines) from the images.
    missing-channel: reconstruct finetune.held_out (default 94A) from the other channels.
    finetune.head=baseline_cnn trains the from-scratch baseline instead.
    """
    with friendly_errors():
        cfg = load_args(_with_backbone(args, backbone))
        _check_task(task, cfg)
        start_ray(dashboard=True)
        run_finetune(cfg, task)
    where_logs()


def run_tune(cfg, task_name: str, num_samples=None, max_concurrent=None, resume=False):
    from sdofm.finetuning.tune import format_table, sweep
    from sdofm.tracking import runs_page, tracking_uri

    result = sweep(cfg, task_name, num_samples, max_concurrent, resume)
    console.print(format_table(result.table, cfg.tune.metric), highlight=False)
    if result.best:
        console.print(
            f"best trial {result.best['trial']}: {cfg.tune.metric} {result.best[cfg.tune.metric]:.4f}, "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.best.items() if k.startswith("test/"))
            + f", MLflow run {result.best['run_id']}"
        )
    print_run_skipped(result.skipped, result.parent_run_id)
    console.print(
        f"sweep: {result.path}   MLflow parent run: {result.parent_run_id}   best head: {result.model_uri}\n"
        f"look: mlflow ui --backend-store-uri {tracking_uri(cfg.tracking.uri)}, then "
        f"{runs_page(tracking_uri(cfg.tracking.uri), cfg.finetune.experiment)}"
    )
    if result.interrupted:
        console.print("interrupted: run the same command with --resume to continue the sweep")
        raise typer.Exit(130)
    return result


def tune_cmd(
    task: Task,
    args: Args = None,
    backbone: Backbone = None,
    num_samples: Annotated[
        int | None, typer.Option(help="Trials to run (default: tune.num_samples).")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Trials at once (default: tune.max_concurrent).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the interrupted sweep tune.name; finished trials are kept."),
    ] = False,
) -> None:
    """Sweep a head's hyperparameters (tune.space: lr, weight decay, head, unfrozen blocks,
    batch) with Ray Tune + ASHA.

    One MLflow parent run for the sweep, a child run per trial; the best head is logged as a model.
    """
    with friendly_errors():
        cfg = load_args(_with_backbone(args, backbone))
        _check_task(task, cfg)
        start_ray(dashboard=True)
        run_tune(cfg, task, num_samples, max_concurrent, resume)
    where_logs()


def run_evaluate(cfg, tasks: list[str] | None, n_boot: int, heads_only: bool = False):
    from sdofm.finetuning.evaluate import evaluate, format_board
    from sdofm.tracking import tracking_uri

    board = evaluate(cfg, tasks, n_boot, heads_only)
    console.print(format_board(board), highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"MLflow run: {board.run_id} (scoreboard.txt, scoreboard.json; "
        "one child run per arm and head seed)\n"
        f"look: mlflow ui --backend-store-uri {tracking_uri(cfg.tracking.uri)}"
    )
    return board


def evaluate_cmd(
    args: Args = None,
    backbone: Backbone = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            help="Task(s) to score (default: every task); 'none' scores the backbone alone."
        ),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the test split.")] = 1000,
    heads_only: Annotated[
        bool,
        typer.Option(
            "--heads-only",
            help="Score the heads only, not the backbone's own reconstructions, generated "
            "frames or forecasts.",
        ),
    ] = False,
) -> None:
    """Score every head on the fixed test split against two controls (the same head on a
    randomly initialised encoder, and the from-scratch baseline), with bootstrap intervals;
    and the backbone's own masked reconstruction per channel against its random-init twin."""
    with friendly_errors():
        if heads_only and task == ["none"]:
            from sdofm.config import ConfigError

            raise ConfigError("--heads-only with --task none scores nothing: name a task")
        cfg = load_args(_with_backbone(args, backbone))
        start_ray(dashboard=True)
        run_evaluate(cfg, [] if task == ["none"] else task, bootstrap, heads_only)
    where_logs()


def run_embed(cfg, out: str, splits: tuple[str, ...], pool: str, shard_size: int):
    from sdofm.finetuning.embed import embed

    with progress("embedding") as update:
        result = embed(cfg, out, splits, pool, shard_size, progress=update)
    rows = ", ".join(f"{s} {n}" for s, n in result.rows.items()) or "none (all shards present)"
    console.print(
        f"embeddings ({result.dim} values per sample, pool {pool!r}) in {out}: rows written {rows}; "
        f"shards written {result.shards_written}, kept {result.shards_kept}"
        + (f"; {result.skipped} samples skipped (unreadable frames)" if result.skipped else "")
        + f" in {result.seconds:.0f} s; MLflow run {result.run_id}",
        highlight=False,
    )
    return result


def embed_cmd(
    args: Annotated[
        list[str],
        typer.Argument(
            help="An optional YAML config, the output folder or "
            "URL (any fsspec URL), then dotted overrides such as data.start=2012-11-01.",
            show_default=False,
        ),
    ],
    backbone: Backbone = None,
    split: Annotated[
        list[str] | None, typer.Option(help="Split(s) to embed (default: train, val and test).")
    ] = None,
    pool: Annotated[
        str,
        typer.Option(
            help="mean: mean of the patch tokens; summary: the summary token; tokens: all."
        ),
    ] = "mean",
    shard_size: Annotated[int, typer.Option(help="Samples per parquet shard.")] = 1024,
) -> None:
    """Embed a split or time range with a pretrained encoder (Ray Data batch inference,
    an actor pool on GPUs when present) into parquet shards; re-run to resume."""
    paths = [a for a in args if "=" not in a]
    if not paths:
        raise typer.BadParameter("give the output folder or URL (OUT_URL)")
    out = paths[-1]
    with friendly_errors():
        cfg = load_args(_with_backbone([*paths[:-1], *(a for a in args if "=" in a)], backbone))
        start_ray(dashboard=True)
        run_embed(cfg, out, tuple(split or ("train", "val", "test")), pool, shard_size)
    where_logs()

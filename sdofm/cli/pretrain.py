"""``sdofm pretrain``: a backbone with Ray Train."""

from __future__ import annotations

import time

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


def run_pretrain(cfg):
    """Pretrain (writing the synthetic Sun first when data.root is empty); print where results are."""
    from sdofm.archive.synthetic import ensure_data
    from sdofm.models import family_of
    from sdofm.pretraining import pretrain
    from sdofm.pretraining.objective import objective_class
    from sdofm.tracking import runs_page

    with progress(f"no stores under {cfg.data.root}: writing the synthetic Sun") as update:
        ensure_data(cfg.data, cfg.synth, progress=update)
    t0 = time.perf_counter()
    result = pretrain(cfg)
    m = result.metrics
    table = Table(show_header=False, title=f"pretraining {cfg.model.name}: run {result.run_name!r}")
    headline = objective_class(family_of(cfg.model.name)).headline
    losses = [k for k in m if k.startswith("train/loss")]  # one per phase of a GAN
    rows = [
        ("steps", f"{m.get('step', '?')} in {time.perf_counter() - t0:.0f} s"),
        *((f"{k} (last interval)", f"{m[k]:.4f}") for k in losses),
        *((k, f"{m[k]:.4f}") for k in headline if k in m),
        ("checkpoint", result.checkpoint),
        ("MLflow run id", result.run_id or "(tracking store unreachable: metrics kept locally)"),
        ("encoder model", result.model_uri or "-"),
        ("MLflow UI", f"mlflow ui --backend-store-uri {result.tracking_uri}"),
        ("runs view", runs_page(result.tracking_uri, cfg.tracking.experiment)),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    print_run_skipped(result.skipped, result.run_id)
    return result


def pretrain_cmd(args: Args = None) -> None:
    """Pretrain a backbone with Ray Train (DDP), checkpointed and logged to MLflow.

    Re-running with the same train.run_name continues from its last checkpoint.
    Uses RAY_ADDRESS when set, else starts a local Ray instance.
    """
    with friendly_errors():
        cfg = load_args(args)
        start_ray(dashboard=True)
        run_pretrain(cfg)
    where_logs()

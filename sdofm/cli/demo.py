"""``sdofm demo``: every stage in turn on the embedded default."""

from __future__ import annotations

from sdofm.cli.common import Args, console, friendly_errors, load_args, start_ray, where_logs
from sdofm.cli.data import run_index, run_info, run_stats, run_synth
from sdofm.cli.finetune import run_tune
from sdofm.cli.pretrain import run_pretrain


def demo_cmd(args: Args = None) -> None:
    """The main job on the embedded default: synthetic Sun -> index -> statistics ->
    MAE pretraining -> a small Ray Tune sweep of the dimming head on that backbone.

    `make demo` passes configs/tune/dimming.yaml (minutes on a laptop CPU).
    """
    from sdofm.tracking import runs_page, tracking_uri

    with friendly_errors():
        cfg = load_args(args)
        start_ray(dashboard=True)  # one Ray instance for every stage
        console.rule("1/5 the synthetic Sun")
        run_synth(cfg)
        console.rule("2/5 the alignment index")
        run_index(cfg)
        run_info(cfg)
        console.rule("3/5 normalisation statistics")
        run_stats(cfg)
        console.rule(f"4/5 pretraining {cfg.model.name}")
        pretrained = run_pretrain(cfg)
        backbone = pretrained.run_id or pretrained.checkpoint
        cfg.finetune.backbone = backbone
        console.rule("5/5 dimming sweep on that backbone")
        swept = run_tune(cfg, "dimming")
        console.rule("where to look")
        uri = tracking_uri(cfg.tracking.uri)
        console.print(
            f"MLflow UI:        mlflow ui --backend-store-uri {uri}\n"
            f"pretraining run:  {pretrained.run_id} (experiment {cfg.tracking.experiment!r}: "
            f"{runs_page(uri, cfg.tracking.experiment)})\n"
            f"dimming sweep:    {swept.parent_run_id} (experiment {cfg.finetune.experiment!r}: "
            f"{runs_page(uri, cfg.finetune.experiment)}), "
            f"best trial run {swept.best['run_id'] if swept.best else '-'}\n"
            f"checkpoints:      {pretrained.checkpoint}, {swept.path}",
            highlight=False,
        )
    where_logs()

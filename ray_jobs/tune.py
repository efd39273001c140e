"""Sweep a science head with Ray Tune on a cluster (the same path as `sdofm tune TASK`).

    ray job submit --working-dir . -- python ray_jobs/tune.py \
        --config configs/tune/dimming.yaml [--task dimming] [--num-samples N] [--max-concurrent N] [--resume] [k=v ...]
"""

import argparse
import sys

from sdofm.config import load_config
from sdofm.finetuning.tune import format_table, sweep
from sdofm.runtime import init_ray

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
parser.add_argument("--task", default="dimming", help="the finetuning task (default: dimming)")
parser.add_argument("--backbone", help="MLflow run id, models:/ URI or checkpoint folder")
parser.add_argument("--num-samples", type=int, help="trials (default: tune.num_samples)")
parser.add_argument(
    "--max-concurrent", type=int, help="trials at once (default: tune.max_concurrent)"
)
parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep")
parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.epochs=5")
args = parser.parse_args()

extra = [f"finetune.backbone={args.backbone}"] if args.backbone else []
cfg = load_config(args.config, [*args.overrides, *extra])
init_ray()
result = sweep(cfg, args.task, args.num_samples, args.max_concurrent, args.resume)
print(format_table(result.table, cfg.tune.metric))
print(f"MLflow parent run id: {result.parent_run_id}; best head: {result.model_uri}")
if result.interrupted:
    sys.exit("interrupted: submit the same command with --resume to continue the sweep")

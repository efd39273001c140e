"""Train a science head on a Ray cluster (the same path as `sdofm finetune TASK`).

    ray job submit --working-dir . -- python ray_jobs/finetune.py \
        --config configs/finetune/dimming.yaml [--task dimming] [--backbone RUN_ID|models:/...|CHECKPOINT] [k=v ...]
"""

import argparse

from sdofm.config import load_config
from sdofm.finetuning.run import finetune
from sdofm.runtime import init_ray

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
parser.add_argument("--task", default="dimming", help="the finetuning task (default: dimming)")
parser.add_argument("--backbone", help="MLflow run id, models:/ URI or checkpoint folder")
parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.epochs=5")
args = parser.parse_args()

extra = [f"finetune.backbone={args.backbone}"] if args.backbone else []
cfg = load_config(args.config, [*args.overrides, *extra])
init_ray()
result = finetune(cfg, args.task)
print(f"MLflow run id: {result.run_id}")
print(f"Test metrics: { {k: v for k, v in result.metrics.items() if k.startswith('test/')} }")
print(f"Checkpoint: {result.checkpoint}")

"""Train the dimming head on a Ray cluster (the same path as `sdofm finetune dimming`).

    ray job submit --working-dir . -- python ray_jobs/finetune.py \
        --config configs/finetune/dimming.yaml [--backbone RUN_ID|models:/...|CHECKPOINT] [k=v ...]
"""

import argparse

from sdofm.config import load_config
from sdofm.finetuning.dimming import finetune

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
parser.add_argument("--backbone", help="MLflow run id, models:/ URI or checkpoint folder")
parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.epochs=5")
args = parser.parse_args()

extra = [f"finetune.backbone={args.backbone}"] if args.backbone else []
result = finetune(load_config(args.config, [*args.overrides, *extra]))
print(f"MLflow run id: {result.run_id}")
print(f"Test MAE of alpha: {result.metrics.get('test/mae')}")
print(f"Checkpoint: {result.checkpoint}")

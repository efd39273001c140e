"""Pretrain a backbone on a Ray cluster (the same path as `sdofm pretrain`).

    ray job submit --working-dir . -- python ray_jobs/pretrain.py \
        --config configs/pretrain/mae_debug.yaml [section.key=value ...]
"""

import argparse

from sdofm.archive.synthetic import ensure_data
from sdofm.config import load_config
from sdofm.pretraining import pretrain
from sdofm.runtime import init_ray

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
args = parser.parse_args()

cfg = load_config(args.config, args.overrides)
ensure_data(cfg.data, cfg.synth)
init_ray()
result = pretrain(cfg)
print(f"MLflow run id: {result.run_id} ({result.tracking_uri})")
print(f"Checkpoint: {result.checkpoint}")
print(f"Encoder model: {result.model_uri}")

"""Build the alignment index and the normalisation statistics where the data is read.

    ray job submit --working-dir . -- python ray_jobs/prepare_data.py \
        --config configs/data/sdoml_aws.yaml data.cache_dir=/mnt/shared/sdofm/cache

The same package calls as ``sdofm data index`` and ``sdofm data stats``; both are
reused while the stores and settings are unchanged. ``--shards URL`` then writes the
prepared shards as ``sdofm data prepare`` does (resuming an interrupted run); train
on them with ``data.prepared=URL``. The default ``data.root``
(``data/synthetic``) holding no store gets the synthetic Sun first; any other root
without stores is an error.
"""

import argparse

from sdofm.archive.synthetic import ensure_data
from sdofm.config import load_config
from sdofm.datasets.index import load_or_build_index
from sdofm.datasets.prepare import prepare
from sdofm.datasets.stats import load_or_compute_stats
from sdofm.runtime import init_ray

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.cadence=24min")
parser.add_argument("--rebuild", action="store_true", help="rebuild the index even if current")
parser.add_argument("--recompute", action="store_true", help="recompute the statistics")
parser.add_argument("--shards", metavar="URL", help="also write prepared shards to this URL")
args = parser.parse_args()

cfg = load_config(args.config, args.overrides)
if ensure_data(cfg.data, cfg.synth):
    print(f"Synthetic Sun written to {cfg.data.root}")
table, report = load_or_build_index(cfg.data, rebuild=args.rebuild)
print(
    f"Index: {report.path} ({report.n_rows:,} aligned steps, {'reused' if report.reused else 'built'})"
)
init_ray()
stats = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table, recompute=args.recompute)
print(f"Statistics: {stats['path']} ({stats['samples']:,} train samples)")
if args.shards:
    shards = prepare(cfg, args.shards)
    for split, n in shards.samples.items():
        print(
            f"{split}: {n:,} samples; {shards.written[split]} shard(s) written, {shards.kept[split]} kept"
        )
    print(f"Prepared shards: {args.shards} ({shards.seconds:.0f} s)")

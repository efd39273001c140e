"""What every job reads before it trains or scores: the alignment index, the train split's
normalisation statistics, and the pipeline over the stores (or prepared shards)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sdofm.config import Config, DataConfig, LoaderConfig, TransformConfig
from sdofm.datasets.index import load_or_build_index
from sdofm.datasets.pipeline import SDOMLPipeline
from sdofm.datasets.stats import load_or_compute_stats


@dataclass
class Inputs:
    table: pd.DataFrame
    """The alignment index."""
    stats: dict | None
    """The train split's statistics under ``cfg.transform`` (None without z-score)."""
    pipeline: SDOMLPipeline


def build_inputs(
    cfg: Config,
    data: DataConfig | None = None,
    transform: TransformConfig | None = None,
    loader: LoaderConfig | None = None,
) -> Inputs:
    """The index and statistics of ``data`` (default ``cfg.data``; built or reused from the
    cache) and a pipeline reading it in ``transform`` with ``loader`` (defaults: the
    config's). The statistics always follow ``cfg.transform``: a job that reads in another
    transform (on the readers, say) z-scores with the same numbers."""
    data = data or cfg.data
    table, _ = load_or_build_index(data)
    stats = (
        load_or_compute_stats(data, cfg.transform, cfg.loader, table)
        if cfg.transform.zscore
        else None
    )
    transform = transform or cfg.transform
    pipe = SDOMLPipeline(
        data, transform, loader or cfg.loader, table, stats if transform.zscore else None
    )
    return Inputs(table, stats, pipe)

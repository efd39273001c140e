"""Embeddings of a split (or a time range) with a pretrained encoder, as parquet shards.

``sdofm embed CONFIG --backbone ID OUT_URL`` runs Ray Data batch inference: the
pipeline's readers feed an actor pool (one encoder per actor, on a GPU when the
cluster has one) and the driver writes the rows in fixed shards of sample ids::

    OUT_URL/embeddings.json              what made them (backbone, data, transform, pool)
    OUT_URL/<split>/part-00000.parquet   split, sample, time, embedding

A shard is written whole (:func:`sdofm.storage.write_atomic`), so an interrupted job
re-run with the same arguments computes only the shards that are missing. A re-run
with another backbone, pooling or data selection into the same folder is refused
rather than mixed in.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from sdofm.config import Config, ConfigError, dump_config
from sdofm.datasets.index import index_key
from sdofm.datasets.inputs import build_inputs
from sdofm.engine.trainer import resolve_use_gpu
from sdofm.finetuning.backbone import resolve_backbone
from sdofm.storage import join, open_url, write_atomic
from sdofm.tracking import log_metrics, log_text, tracked_run, tracking_uri

MANIFEST = "embeddings.json"
POOLS = ("mean", "summary", "tokens")


@dataclass
class EmbedResult:
    out: str
    dim: int
    rows: dict[str, int] = field(default_factory=dict)
    """split -> rows written by this call."""
    shards_written: int = 0
    shards_kept: int = 0
    """Shards already complete from an earlier call (not recomputed)."""
    skipped: int = 0
    """Samples the readers skipped (unreadable or bad frames): no row for them."""
    run_id: str | None = None
    seconds: float = 0.0


def pool_tokens(tokens, pool: str):
    """(B, 1 + L, D) encoder tokens -> (B, D) (``mean`` of the patch tokens, the ``summary``
    token) or (B, (1 + L) * D) (``tokens``: all of them, flattened)."""
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    if pool == "summary":
        return tokens[:, 0]
    if pool == "tokens":
        return tokens.flatten(1)
    raise ValueError(f"pool must be one of {POOLS}, not {pool!r}")


class _Embedder:
    """A Ray Data actor: one encoder, batches of images in, pooled features out."""

    def __init__(self, backbone: list, pool: str, device: str):
        import ray
        import torch

        # A reference in a list reaches the actor unresolved: the weights are fetched here
        # rather than held as the actor's constructor arguments.
        backbone = ray.get(backbone[0])

        self.device = torch.device(device)
        self.encoder = backbone.encoder().to(self.device).eval()
        self.pool = pool

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(batch["image"], device=self.device, dtype=torch.float32)
            feats = pool_tokens(self.encoder.forward_features(x), self.pool)
        return {
            "sample": batch["sample"],
            "time": batch["time"][:, -1],
            "embedding": feats.float().cpu().numpy(),
        }


def _shard_path(out: str, split: str, k: int) -> str:
    return join(out, split, f"part-{k:05d}.parquet")


def _write_shard(fs, path: str, split: str, rows: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = np.argsort(rows["sample"])
    emb = rows["embedding"][order].astype(np.float32)
    table = pa.table(
        {
            "split": pa.array([split] * len(order), pa.string()),
            "sample": pa.array(rows["sample"][order], pa.int64()),
            "time": pa.array(rows["time"][order].astype("datetime64[ns]")),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb.ravel()), emb.shape[1] if emb.ndim == 2 else 0
            ),
        }
    )
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_atomic(fs, path, buf.getvalue().to_pybytes())


def _check_manifest(fs, root: str, manifest: dict) -> None:
    path = f"{root}/{MANIFEST}"
    if fs.exists(path):
        with fs.open(path) as f:
            old = json.load(f)
        differ = sorted(k for k in manifest if k != "splits" and old.get(k) != manifest[k])
        if differ:
            raise ConfigError(
                f"{path} holds embeddings made with other settings ({', '.join(differ)} differ): "
                "write to another folder, or delete this one"
            )
        manifest["splits"] = sorted(set(old.get("splits", [])) | set(manifest["splits"]))
    fs.makedirs(root, exist_ok=True)
    write_atomic(fs, path, json.dumps(manifest, indent=2).encode())


def embed(
    cfg: Config,
    out: str,
    splits: tuple[str, ...] = ("train", "val", "test"),
    pool: str = "mean",
    shard_size: int = 1024,
    batch_size: int = 16,
    progress=None,
) -> EmbedResult:
    """Embed every sample of ``splits`` (of ``cfg.data``'s time range) with the encoder of
    ``cfg.finetune.backbone``; rows in the pipeline's sample ids of each split."""
    import ray
    from ray.data import ActorPoolStrategy

    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    t0 = time.perf_counter()
    d = cfg.data
    loader = cfg.loader.model_copy(update={"shuffle": False})
    # The encoder sees model-ready images: transformed on the readers here.
    transform = cfg.transform.model_copy(update={"on": "reader"})
    pipe = build_inputs(cfg, transform=transform, loader=loader).pipeline
    shape = pipe.sample_shape()
    uri = tracking_uri(cfg.tracking.uri)
    backbone = resolve_backbone(
        cfg.finetune.backbone, uri, cfg.tracking.experiment, cfg.train.storage_options
    )
    backbone.check(cfg, shape)

    fs, root = open_url(out, d.storage_options)
    manifest = {
        "backbone": backbone.source,
        "backbone_run_id": backbone.run_id,
        "family": backbone.family,
        "pool": pool,
        "shard_size": shard_size,
        "channels": list(d.channels),
        "sample_shape": list(shape),
        "index_key": index_key(d),
        "transform": dump_config(cfg.transform),
        "splits": sorted(splits),
    }
    _check_manifest(fs, root, manifest)

    use_gpu = resolve_use_gpu(cfg.scaling.use_gpu)
    result = EmbedResult(out, dim=0)
    params = {
        "backbone": backbone.source,
        "out": out,
        "pool": pool,
        "splits": ",".join(splits),
        "data.root": d.root,
        "data.start": d.start,
        "data.end": d.end,
        "data.channels": ",".join(d.channels),
    }
    tags = {"sdofm.task": "embed", "sdofm.backbone": backbone.source, "sdofm.embeddings": out}
    name = f"embed-{index_key(d)}-{pool}"
    with tracked_run(
        uri, cfg.tracking.experiment, name, out, params, tags, d.storage_options, dump_config(cfg)
    ) as run:
        result.run_id = run_id = run.run_id
        for split in splits:
            n = pipe.num_samples(split)
            shards = [np.arange(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
            missing = [k for k in range(len(shards)) if not fs.exists(_shard_path(root, split, k))]
            result.shards_kept += len(shards) - len(missing)
            if not missing:
                continue
            subset = np.concatenate([shards[k] for k in missing])
            owner = np.full(n, -1)
            for k in missing:
                owner[shards[k]] = k
            ds = pipe.dataset(split, epoch=0, subset=subset).map_batches(
                _Embedder,
                fn_constructor_kwargs={
                    "backbone": [ray.put(backbone)],
                    "pool": pool,
                    "device": "cuda" if use_gpu else "cpu",
                },
                batch_size=batch_size,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=cfg.scaling.num_workers),
                num_gpus=1 if use_gpu else 0,
                num_cpus=cfg.scaling.cpus_per_worker,
            )
            buf: dict[int, list[dict]] = {k: [] for k in missing}
            left = {k: len(shards[k]) for k in missing}
            done = 0
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                # The plan's ids are positions in `subset`: map them back to the split's ids.
                ids = subset[b["sample"]]
                result.dim = b["embedding"].shape[1]
                for k in np.unique(owner[ids]):
                    sel = owner[ids] == k
                    buf[k].append(
                        {
                            "sample": ids[sel],
                            "time": b["time"][sel],
                            "embedding": b["embedding"][sel],
                        }
                    )
                    left[k] -= int(sel.sum())
                    if left[k] == 0:
                        _flush(fs, root, split, k, buf, result)
                done += len(ids)
                if progress:
                    progress(done, len(subset))
            for k in [k for k in missing if buf.get(k) is not None]:
                # Samples the readers skipped never arrive: the shard is written without them.
                result.skipped += left[k]
                _flush(fs, root, split, k, buf, result)
        result.seconds = time.perf_counter() - t0
        total = sum(result.rows.values())
        log_text(uri, run_id, json.dumps(manifest, indent=2), MANIFEST)
        log_metrics(
            uri,
            run_id,
            {
                "embed/rows": total,
                "embed/skipped": result.skipped,
                "embed/rows_per_s": total / max(result.seconds, 1e-9),
            },
        )
    return result


def _flush(fs, root: str, split: str, k: int, buf: dict, result: EmbedResult) -> None:
    parts = buf.pop(k)
    if not parts:
        buf[k] = None
        return
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    _write_shard(fs, _shard_path(root, split, k), split, rows)
    result.rows[split] = result.rows.get(split, 0) + len(rows["sample"])
    result.shards_written += 1
    buf[k] = None


def read_embeddings(out: str, split: str | None = None, storage_options: dict | None = None):
    """The embeddings under ``out`` (one split or all) as a pandas DataFrame, sorted."""
    import pandas as pd
    import pyarrow.parquet as pq

    fs, root = open_url(out, storage_options)
    pattern = join(root, split or "*", "part-*.parquet")
    frames = []
    for p in sorted(fs.glob(pattern)):
        with fs.open(p, "rb") as f:
            frames.append(pq.read_table(f).to_pandas())
    if not frames:
        raise FileNotFoundError(f"no embeddings under {out} ({pattern})")
    return pd.concat(frames).sort_values(["split", "sample"]).reset_index(drop=True)

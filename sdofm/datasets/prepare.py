"""Writing prepared shards (``sdofm data prepare``): the streaming readers run once over
each split as a Ray Data job and what they emit is written in the layout
:mod:`sdofm.datasets.prepared` reads. Shard k of a split always holds the same samples, so
an interrupted run resumes by writing only the shards not yet committed."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
import uuid
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from sdofm.config import Config, ConfigError
from sdofm.datasets.blocks import plan_split
from sdofm.datasets.index import index_key
from sdofm.datasets.inputs import build_inputs
from sdofm.datasets.pipeline import ReadSpec, reader_for
from sdofm.datasets.prepared import (
    FORMAT,
    MANIFEST,
    decode,
    differences,
    digest,
    encode,
    settings,
    stats_fingerprint,
)
from sdofm.storage import join, listdir, open_url, read_bytes, write_atomic


@dataclass
class PrepareReport:
    """What a prepare run did."""

    url: str
    written: dict[str, int] = field(default_factory=dict)  # split -> shards written now
    kept: dict[str, int] = field(default_factory=dict)  # split -> shards already there
    samples: dict[str, int] = field(default_factory=dict)  # split -> samples held
    skipped: list[dict] = field(default_factory=list)  # unusable frames (each once)
    seconds: float = 0.0


def _shard_meta(root: str, split: str, k: int) -> str:
    return join(root, split, f"{k:05d}.npz")


def _write_shards(batch: dict, job: dict) -> dict:
    """A Ray Data task: read the samples of each shard in ``batch`` and write the shard."""
    import ray

    fs, root = open_url(job["url"], job["storage_options"])
    out = {"split": [], "shard": [], "samples": []}
    for split, k in zip(batch["split"], batch["shard"], strict=True):
        k = int(k)
        spec = ReadSpec(
            f"{job['key']}-{split}",
            job["data"],
            job["transform"],
            job["loader"],
            job["plans"][split],
            job["stats"],
            registry="",
        )
        reader = reader_for(spec)
        parts, skipped = [], []
        b0, b1 = ray.get(job["shard_blocks"][split])[k]
        for b in range(b0, b1):
            got, why = reader.read_block(b, 0)
            x = encode(got["image"], job["dtype"])  # a new array: the reader reuses its buffer
            finite = np.isfinite(decode(x, job["dtype"]))
            if not finite.all():
                bad = np.flatnonzero(~finite.all(axis=(0, 2, 3, 4)))
                names = [job["data"].channels[i] for i in bad]
                raise ValueError(
                    f"prepare: shard {k} of {split} has values of channel(s) {names} that do "
                    f"not fit {job['dtype']} (largest {np.abs(got['image']).max():.4g}): use "
                    "prepare.dtype=bfloat16, or scale these channels"
                )
            parts.append({**{k_: v.copy() for k_, v in got.items() if k_ != "image"}, "image": x})
            skipped += [
                {
                    "store": s.store,
                    "year": s.year,
                    "channel": s.channel,
                    "frame": s.frame,
                    "reason": s.reason,
                    "samples": list(s.samples),
                }
                for s in why
            ]
        cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        write_atomic(fs, f"{root}/{split}/{k:05d}.bin", cat.pop("image").tobytes())
        meta = io.BytesIO()
        np.savez(meta, fingerprint=job["fingerprint"], skipped=json.dumps(skipped), **cat)
        write_atomic(fs, _shard_meta(root, split, k), meta.getvalue())  # commits the shard
        out["split"].append(split)
        out["shard"].append(k)
        out["samples"].append(len(cat["sample"]))
    return {k: np.array(v) for k, v in out.items()}


def _committed(
    url: str, storage_options: dict, split: str, n_shards: int, fingerprint: str
) -> dict[int, dict]:
    """The shards of ``split`` under ``url`` already written by a job of this fingerprint:
    k -> meta."""
    try:
        names = set(listdir(join(url, split), storage_options))
    except FileNotFoundError:
        return {}
    out = {}
    for k in range(n_shards):
        if f"{k:05d}.npz" in names and f"{k:05d}.bin" in names:
            raw = read_bytes(_shard_meta(url, split, k), storage_options)
            z = np.load(io.BytesIO(raw))
            if str(z["fingerprint"]) == fingerprint:
                out[k] = {key: z[key] for key in z.files}
    return out


def prepare(cfg: Config, out: str, progress=None) -> PrepareReport:
    """Write ``cfg``'s splits as prepared shards to ``out`` (a folder or fsspec URL), with
    Ray Data readers spread over the cluster; resume what an earlier run left."""

    import ray

    t0 = time.perf_counter()
    d, pc = cfg.data.model_copy(update={"prepared": None}), cfg.prepare
    transform = cfg.transform.model_copy(update={"on": "reader", "dtype": "float32"})
    loader = cfg.loader.model_copy(update={"shuffle": False})
    inputs = build_inputs(cfg, data=d, transform=transform, loader=loader)
    table, stats = inputs.table, inputs.stats
    shape = inputs.pipeline.sample_shape()
    job_settings = {
        **settings(d, cfg.transform),
        "index_key": index_key(d),
        "index_fingerprint": str(int(pd.util.hash_pandas_object(table, index=False).sum())),
        "stats_fingerprint": stats_fingerprint(stats),
        "prepare.dtype": pc.dtype,
        "prepare.shard_samples": pc.shard_samples,
        "format": FORMAT,
    }
    fingerprint = digest(job_settings)
    fs, root = open_url(out, d.storage_options)
    mpath = f"{root}/{MANIFEST}"
    old = json.loads(fs.cat_file(mpath)) if fs.exists(mpath) else None
    if old is not None and old.get("fingerprint") != fingerprint:
        differ = differences(old.get("job", {}), job_settings)
        raise ConfigError(
            f"{out} holds shards prepared with other settings ({'; '.join(differ)}): "
            "prepare to another URL, or delete this one"
        )
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "job": job_settings,
        "settings": settings(d, cfg.transform),
        "dtype": pc.dtype,
        "sample_shape": list(shape),
        "channels": list(d.channels),
        "eve_lines": list(d.eve_lines),
        "stats": None if stats is None else {k: v for k, v in stats.items() if k != "path"},
        "complete": False,
    }
    fs.makedirs(root, exist_ok=True)
    write_atomic(fs, mpath, json.dumps(manifest, indent=1).encode())

    report = PrepareReport(out)
    plans, shard_blocks, todo, metas, windows = {}, {}, [], {}, {}
    for split in pc.splits:
        plan = plan_split(d, loader, table, split)
        windows[split] = plan.num_samples
        order = np.concatenate(plan.blocks) if plan.blocks else np.zeros(0, np.int64)
        shards = [order[i : i + pc.shard_samples] for i in range(0, len(order), pc.shard_samples)]
        # Each shard's samples in blocks of its own (store order): a shard is one read job.
        blocks, ranges = [], []
        for s in shards:
            b0 = len(blocks)
            blocks += [s[i : i + loader.block_size] for i in range(0, len(s), loader.block_size)]
            ranges.append((b0, len(blocks)))
        plans[split] = ray.put(replace(plan, blocks=blocks))
        shard_blocks[split] = ray.put(ranges)
        metas[split] = _committed(out, d.storage_options, split, len(shards), fingerprint)
        report.kept[split] = len(metas[split])
        todo += [{"split": split, "shard": k} for k in range(len(shards)) if k not in metas[split]]
        fs.makedirs(f"{root}/{split}", exist_ok=True)
    for split in pc.splits:
        report.written[split] = 0
    if todo:
        job = {
            "key": uuid.uuid4().hex[:12],
            "url": out,
            "storage_options": d.storage_options,
            "data": d,
            "transform": transform,
            "loader": loader,
            "plans": plans,
            "shard_blocks": shard_blocks,
            "stats": stats,
            "fingerprint": fingerprint,
            "dtype": pc.dtype,
        }
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            _write_shards,
            fn_kwargs={"job": job},
            batch_size=1,
            num_cpus=cfg.loader.cpus_per_reader,
            concurrency=cfg.loader.readers,
        )
        done = 0
        for row in ds.iter_rows():
            split, k = str(row["split"]), int(row["shard"])
            z = np.load(io.BytesIO(fs.cat_file(_shard_meta(root, split, k))))
            metas[split][k] = {key: z[key] for key in z.files}
            report.written[split] += 1
            done += 1
            if progress:
                progress(done, len(todo))

    splits = {}
    seen: dict[tuple, dict] = {}
    for split in pc.splits:
        ks = sorted(metas[split])
        n = sum(len(metas[split][k]["sample"]) for k in ks)
        splits[split] = {"windows": windows[split], "samples": n, "shards": len(ks)}
        report.samples[split] = n
        for k in ks:
            for s in json.loads(str(metas[split][k]["skipped"])):
                key = (s["store"], s["year"], s["channel"], s["frame"])
                entry = seen.setdefault(key, {**s, "samples": {}})
                entry["samples"].setdefault(split, set()).update(s["samples"])
        if not n:
            continue
        idx = {
            "sample": np.concatenate([metas[split][k]["sample"] for k in ks]),
            "shard": np.concatenate([np.full(len(metas[split][k]["sample"]), k) for k in ks]),
            "row": np.concatenate([np.arange(len(metas[split][k]["sample"])) for k in ks]),
            "time": np.concatenate([metas[split][k]["time"] for k in ks]),
            "deg_cor": np.concatenate([metas[split][k]["deg_cor"] for k in ks]),
        }
        if d.eve_lines:
            idx["eve"] = np.concatenate([metas[split][k]["eve"] for k in ks])
        buf = io.BytesIO()
        np.savez(buf, **idx)
        write_atomic(fs, f"{root}/{split}/index.npz", buf.getvalue())
    report.skipped = [
        {**s, "samples": {k: sorted(v) for k, v in s["samples"].items()}}
        for _, s in sorted(seen.items())
    ]
    # Splits an earlier run of the same settings prepared stay part of the folder.
    kept = {k: v for k, v in (old or {}).get("splits", {}).items() if k not in splits}
    kept_skips = [
        {**s, "samples": {k: v for k, v in s["samples"].items() if k in kept}}
        for s in (old or {}).get("skipped", [])
        if set(s["samples"]) & set(kept)
    ]
    manifest.update(
        splits={**kept, **splits},
        skipped=report.skipped + kept_skips,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        complete=True,
    )
    write_atomic(fs, mpath, json.dumps(manifest, indent=1).encode())  # last: the folder is usable
    report.seconds = time.perf_counter() - t0
    return report

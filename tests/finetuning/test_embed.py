"""`sdofm embed`: Ray Data batch inference into parquet shards, resumable, tracked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from sdofm.config import ConfigError, load_config
from sdofm.datasets.index import load_or_build_index
from sdofm.datasets.pipeline import SDOMLPipeline
from sdofm.datasets.stats import load_or_compute_stats
from sdofm.finetuning.embed import embed, read_embeddings
from tests.conftest import small_config
from tests.finetuning.test_dimming import _checkpoint


def test_embeddings_equal_the_encoder_output_resume_and_are_tracked(
    synth_root, tmp_path, ray_session
):
    model = _checkpoint(tmp_path / "backbone", channels=load_config().data.channels).eval()
    db = tmp_path / "mlflow.db"
    cfg = small_config(
        synth_root,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"tracking.uri=sqlite:///{db}",
        f"finetune.backbone={tmp_path / 'backbone'}",
        "loader.readers=1",
        "loader.block_size=16",
        "scaling.cpus_per_worker=0.25",
    )
    out = tmp_path / "emb"
    first = embed(cfg, str(out), splits=("val", "test"), shard_size=24, batch_size=8)
    df = read_embeddings(str(out))

    # The reference: the same samples through the pipeline and the encoder, without Ray Data's
    # actor pool, batching or the parquet round trip.
    table, _ = load_or_build_index(cfg.data)
    stats = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
    pipe = SDOMLPipeline(cfg.data, cfg.transform, cfg.loader, table, stats)
    n = {s: pipe.num_samples(s) for s in ("val", "test")}
    assert first.rows == n and first.skipped == 0
    assert first.shards_written == sum(-(-v // 24) for v in n.values()) >= 3
    assert len(df) == n["val"] + n["test"]
    for split in ("val", "test"):
        got = df[df.split == split]
        assert got["sample"].tolist() == list(range(n[split]))
        ref = pipe.dataset(split, epoch=0).take_batch(n[split], batch_format="numpy")
        with torch.no_grad():
            feats = model.encoder().eval().forward_features(torch.from_numpy(ref["image"]))
        want = feats[:, 1:].mean(dim=1).numpy()
        rows = got.set_index("sample").loc[ref["sample"]]
        np.testing.assert_allclose(np.stack(rows["embedding"]), want, rtol=1e-4, atol=1e-5)
        assert (
            rows["time"].to_numpy().astype("datetime64[ns]")
            == ref["time"][:, -1].astype("datetime64[ns]")
        ).all()

    # Interrupted: one shard lost. The re-run computes only that shard, with the same values.
    lost = out / "test" / "part-00000.parquet"
    lost.unlink()
    again = embed(cfg, str(out), splits=("val", "test"), shard_size=24, batch_size=8)
    assert again.shards_written == 1 and again.shards_kept == first.shards_written - 1
    assert again.rows == {"test": min(24, n["test"])}
    redo = read_embeddings(str(out))
    np.testing.assert_array_equal(np.stack(redo["embedding"]), np.stack(df["embedding"]))

    # Other settings into the same folder are refused, not mixed in.
    with pytest.raises(ConfigError, match="pool"):
        embed(cfg, str(out), splits=("test",), pool="summary", shard_size=24)

    runs = MlflowClient(f"sqlite:///{db}").search_runs(
        [
            MlflowClient(f"sqlite:///{db}")
            .get_experiment_by_name(cfg.tracking.experiment)
            .experiment_id
        ],
        filter_string="tags.`sdofm.task` = 'embed'",
    )
    assert len(runs) == 1  # the re-run continued the same run
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["sdofm.embeddings"] == str(out)
    assert runs[0].data.metrics["embed/rows"] == again.rows["test"]
    logged = MlflowClient(f"sqlite:///{db}").download_artifacts(
        runs[0].info.run_id, "config.yaml", str(tmp_path / "cfg")
    )
    assert yaml.safe_load(Path(logged).read_text())["data"]["root"] == cfg.data.root

"""Prepared shards (``sdofm data prepare``, ``data.prepared``): the same samples as the
streaming pipeline within the stored dtype's rounding, resumable, refused when prepared
for other settings, readable over S3 and by a pretraining run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sdofm.cli import app
from sdofm.config import ConfigError
from sdofm.datasets.index import load_or_build_index
from sdofm.datasets.pipeline import SDOMLPipeline
from sdofm.datasets.prepare import prepare
from sdofm.datasets.prepared import decode, encode
from sdofm.datasets.stats import load_or_compute_stats
from tests.conftest import SMALL, small_config
from tests.s3 import storage_options

EXTRA = (
    "data.num_frames=2",
    "data.frame_step=1h",
    "data.eve_lines=[He II, Fe XVIII]",
    "transform.size=16",
    "transform.stats_samples=64",
    "prepare.shard_samples=40",
)
SPLITS = ("train", "val", "test")


def _args(root, cache, *extra) -> list[str]:
    return [
        f"data.cache_dir={cache}",
        "loader.block_size=8",
        "loader.readers=1",
        "loader.shuffle_buffer=0",
        *EXTRA,
        *extra,
    ]


def _cfg(root, cache, *extra):
    return small_config(root, *_args(root, cache, *extra))


def _pipe(cfg) -> SDOMLPipeline:
    table, _ = load_or_build_index(cfg.data)
    stats = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
    return SDOMLPipeline(cfg.data, cfg.transform, cfg.loader, table, stats)


def _by_id(pipe, split, **kw) -> dict[int, dict]:
    out = {}
    for b in pipe.dataset(split, epoch=0, **kw).iter_batches(batch_size=8, batch_format="numpy"):
        for j, i in enumerate(b["sample"]):
            out[int(i)] = {k: v[j] for k, v in b.items()}
    return out


@pytest.fixture(scope="module")
def prepared(synth_root, tmp_path_factory, ray_session):
    """The session archive prepared once (float16, shards of 40 samples)."""
    tmp = tmp_path_factory.mktemp("prepared")
    cfg = _cfg(synth_root, tmp / "cache")
    report = prepare(cfg, str(tmp / "shards"))
    return cfg, tmp / "shards", report


def test_prepared_samples_equal_the_streaming_ones(prepared):
    cfg, out, report = prepared
    assert all(report.written[s] > 0 and report.kept[s] == 0 for s in SPLITS)
    assert report.written["train"] >= 2  # shard boundaries are crossed
    stream = _pipe(cfg)  # transform on the readers, float32
    ready = _pipe(
        cfg.model_copy(update={"data": cfg.data.model_copy(update={"prepared": str(out)})})
    )
    assert ready.sample_shape() == stream.sample_shape() == (12, 2, 16, 16)
    for split in SPLITS:
        assert ready.num_samples(split) == stream.num_samples(split)
        a, b = _by_id(stream, split), _by_id(ready, split)
        assert sorted(a) == sorted(b) and len(a) == report.samples[split] > 0
        for i, x in a.items():
            y = b[i]
            assert set(y) == set(x) == {"image", "time", "sample", "deg_cor", "eve"}
            assert y["image"].dtype == np.float32
            # float16 keeps 11 significant bits: half an ulp of the value (subnormals: 2**-25)
            tol = np.maximum(np.abs(x["image"]) * 2.0**-11, 2.0**-25)
            assert (np.abs(y["image"] - x["image"]) <= tol).all(), (split, i)
            assert np.array_equal(y["time"], x["time"])
            assert np.array_equal(y["deg_cor"], x["deg_cor"])
            assert np.array_equal(y["eve"], x["eve"])
        if split == "train":
            train = a
    # Read in the stored dtype (each sample straight into its place in the block): the
    # same values, bit for bit, as float16.
    half = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"prepared": str(out)}),
            "transform": cfg.transform.model_copy(update={"dtype": "float16"}),
        }
    )
    for split in SPLITS:
        a, b = _by_id(ready, split), _by_id(_pipe(half), split)
        assert sorted(a) == sorted(b)
        for i, x in a.items():
            assert b[i]["image"].dtype == np.float16
            assert np.array_equal(b[i]["image"], x["image"].astype(np.float16)), (split, i)
    # A subset, and the training order: every asked sample once, reproducible per epoch.
    # (a subset's samples are numbered by their position in it, as the streaming ones)
    sub = np.array([42, 1, 5, 6, 30, 41])
    x, y = _by_id(stream, "train", subset=sub), _by_id(ready, "train", subset=sub)
    assert sorted(x) == sorted(y) == list(range(6))
    assert all(np.array_equal(x[j]["time"], train[sub[j]]["time"]) for j in x)
    assert all(np.array_equal(x[j]["time"], y[j]["time"]) for j in x)
    order = [int(i) for b in ready.dataset("train", epoch=3).iter_batches() for i in b["sample"]]
    again = [int(i) for b in ready.dataset("train", epoch=3).iter_batches() for i in b["sample"]]
    assert order == again and order != sorted(order) and sorted(order) == sorted(train)


def test_bfloat16_rounds_as_torch_does_and_both_dtypes_decode():
    x = np.random.default_rng(0).normal(0, 30, 10_000).astype(np.float32)
    x[:3] = (0.0, -1e30, 3.0e38)
    ours = encode(x, "bfloat16")
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(decode(ours, "bfloat16"), (ours.astype(np.uint32) << 16).view(np.float32))
    half = x[3:].astype(np.float16)  # (the first three do not fit float16)
    assert np.array_equal(decode(half.view(np.uint16), "float16"), half.astype(np.float32))


def test_an_interrupted_prepare_resumes_with_what_is_missing(prepared, tmp_path):
    cfg, out, report = prepared
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*.bin")}
    # An interruption: the manifest not yet complete, a shard never committed (its .npz
    # missing), another not written at all, a temporary file left behind.
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (copy / "train" / "00001.npz").unlink()
    (copy / "val" / "00000.bin").unlink()
    (copy / "val" / "00000.npz").unlink()
    (copy / "train" / "00002.bin.1234abcd.tmp").write_bytes(b"half")
    with pytest.raises(ConfigError, match="not prepared to the end"):
        SDOMLPipeline(
            cfg.data.model_copy(update={"prepared": str(copy)}), cfg.transform, cfg.loader
        )
    args = [*SMALL, f"data.root={cfg.data.root}", *_args(cfg.data.root, cfg.data.cache_dir)]
    r = CliRunner().invoke(app, ["data", "prepare", *args, str(copy)])
    assert r.exit_code == 0, r.output
    for split, written in (("train", 1), ("val", 1), ("test", 0)):
        kept = report.written[split] - written
        line = (
            f"{split}: {report.samples[split]} samples; {written} shard(s) written, {kept} already"
        )
        assert line in r.output, r.output
    after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*.bin")}
    assert after == before
    assert json.loads((copy / "manifest.json").read_text())["complete"] is True


def test_other_settings_are_refused_naming_them(prepared, tmp_path):
    cfg, out, _ = prepared
    other = _cfg(cfg.data.root, cfg.data.cache_dir, "transform.size=8")
    with pytest.raises(ConfigError, match=r"transform.size: prepared 16, asked 8"):
        prepare(other, str(out))
    asked = cfg.data.model_copy(update={"prepared": str(out), "aia_channels": ["171A", "193A"]})
    with pytest.raises(
        ConfigError, match=r"data.aia_channels: prepared \[.*\], asked \['171A', '193A'\]"
    ):
        SDOMLPipeline(asked, cfg.transform, cfg.loader)
    limb = cfg.transform.model_copy(update={"limb": "mask_off_disk"})
    with pytest.raises(ConfigError, match="transform.limb"):
        SDOMLPipeline(cfg.data.model_copy(update={"prepared": str(out)}), limb, cfg.loader)
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        SDOMLPipeline(
            cfg.data.model_copy(update={"prepared": str(tmp_path)}), cfg.transform, cfg.loader
        )


def test_prepare_to_s3_and_read_back(prepared, s3_server, tmp_path):
    cfg, out, _ = prepared
    s3_server.create_bucket("sdofm-prepared")
    opts = storage_options(s3_server.url)
    url = "s3://sdofm-prepared/shards"
    s3_cfg = _cfg(
        cfg.data.root,
        cfg.data.cache_dir,
        "prepare.splits=[val]",
        f"data.storage_options={json.dumps(opts)}",
    )
    report = prepare(s3_cfg, url)
    assert report.written == {"val": (report.samples["val"] + 39) // 40}
    local = _by_id(
        _pipe(cfg.model_copy(update={"data": cfg.data.model_copy(update={"prepared": str(out)})})),
        "val",
    )
    remote = _by_id(
        _pipe(s3_cfg.model_copy(update={"data": s3_cfg.data.model_copy(update={"prepared": url})})),
        "val",
    )
    assert sorted(local) == sorted(remote)
    assert all(np.array_equal(local[i]["image"], remote[i]["image"]) for i in local)


def test_mae_debug_pretrains_on_prepared_shards(prepared, tmp_path):
    from sdofm.pretraining import pretrain

    cfg, out, _ = prepared
    run = _cfg(
        cfg.data.root,
        cfg.data.cache_dir,
        f"data.prepared={out}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.system_metrics=false",
        "tracking.log_model=false",
        "model.name=mae_debug",
        "transform.on=device",  # ignored: the shards are transformed
        "train.max_steps=3",
        "train.val_every=3",
        "train.checkpoint_every=3",
        "train.val_samples=8",
        "scaling.cpus_per_worker=0.25",
    )
    result = pretrain(run)
    assert result.metrics["step"] == 3 and np.isfinite(result.metrics["train/loss"])

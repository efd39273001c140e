"""sdofm reading through ``s3://`` from a real S3 endpoint (moto's server over HTTP).

The session's synthetic archive is uploaded to a public bucket and read anonymously,
as the public SDOML bucket is, through ``data.storage_options``. A counting proxy in
front of the endpoint shows what went over the wire: each array's header (``.zattrs``)
is fetched at most once per process, not at all when the index is reused, and never
by the readers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdofm.cli import app
from sdofm.config import load_config
from sdofm.datasets.blocks import BlockReader, plan_split
from sdofm.datasets.index import load_or_build_index
from sdofm.datasets.sdoml import clear_header_cache
from sdofm.datasets.stats import load_or_compute_stats
from tests.conftest import SMALL
from tests.s3 import free_port, storage_options

BUCKET = "sdofm-s3-data"
REPO = Path(__file__).resolve().parents[1]
ARRAY_HEADER = re.compile(r"/\d{4}/[^/]+/\.zattrs$")  # an image array's header, not a group's
runner = CliRunner()


@pytest.fixture(scope="module")
def s3_root(s3_server, synth_root, tmp_path_factory) -> str:
    """The session archive in a public bucket, plus a copy with a second year (2013)."""
    s3_server.create_bucket(BUCKET, public=True)
    s3_server.upload_tree(synth_root, BUCKET, "sdoml")
    two = tmp_path_factory.mktemp("two-years") / "sdoml"
    chunks = shutil.ignore_patterns("[0-9]*.[0-9]*.[0-9]*")  # headers only: info reads no pixels
    shutil.copytree(synth_root / "sdomlv2.zarr", two / "sdomlv2.zarr", ignore=chunks)
    shutil.copytree(two / "sdomlv2.zarr" / "2012", two / "sdomlv2.zarr" / "2013")
    s3_server.upload_tree(two, BUCKET, "two-years")
    return f"s3://{BUCKET}/sdoml"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """Index and statistics shared by the Ray tests (they depend on the data only)."""
    return tmp_path_factory.mktemp("s3-cache")


def _args(root: str, endpoint: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        *SMALL,
        f"data.root={root}",
        f"data.storage_options={json.dumps(storage_options(endpoint, anon=True))}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


def _header_gets(proxy) -> Counter:
    return Counter(r.key for r in proxy.gets(".zattrs") if ARRAY_HEADER.search(r.key))


def test_index_fetches_each_header_once_and_reuse_fetches_none(
    s3_root, s3_proxy, synth_root, tmp_path
):
    args = _args(s3_root, s3_proxy.url, tmp_path)
    clear_header_cache()
    r = runner.invoke(app, ["data", "index", *args])
    assert r.exit_code == 0 and "built index" in r.output, r.output
    fetched = _header_gets(s3_proxy)
    channels = load_config(None, args).data.channels
    assert sorted(k.split("/")[-2] for k in fetched) == sorted(channels)
    assert set(fetched.values()) == {1}, fetched  # one fetch per array
    # Whole headers, each once: the bytes are those of the stored files.
    stored = sum((synth_root / k.split("/", 1)[1]).stat().st_size for k in fetched)
    assert sum(r.bytes_out for r in s3_proxy.gets(".zattrs") if r.key in fetched) == stored

    s3_proxy.reset()
    clear_header_cache()  # a new process: nothing parsed yet
    r = runner.invoke(app, ["data", "index", *args])
    assert r.exit_code == 0 and "reused index" in r.output, r.output
    assert not _header_gets(s3_proxy), _header_gets(s3_proxy)
    assert s3_proxy.requests and not [r for r in s3_proxy.gets() if r.key.endswith("0.0")]


def test_index_over_s3_equals_the_local_index(s3_root, s3_server, synth_root, tmp_path):
    remote = load_config(None, _args(s3_root, s3_server.url, tmp_path / "s3"))
    local = load_config(None, [*SMALL, f"data.root={synth_root}", f"data.cache_dir={tmp_path}"])
    a, _ = load_or_build_index(remote.data)
    b, _ = load_or_build_index(local.data)
    assert len(a) > 100
    assert a.equals(b)
    # DEG_COR in the table is the stored header's entry (read here with json, not sdofm).
    attrs = json.loads((synth_root / "sdomlv2.zarr" / "2012" / "94A" / ".zattrs").read_text())
    np.testing.assert_allclose(
        a["94A_deg"], np.array(attrs["DEG_COR"], np.float32)[a["94A_idx"]], rtol=1e-6
    )


def test_a_reader_downloads_no_header(s3_root, s3_proxy, synth_root, tmp_path):
    import zarr

    cfg = load_config(None, _args(s3_root, s3_proxy.url, tmp_path, "data.num_frames=2"))
    table, _ = load_or_build_index(cfg.data)
    plan = plan_split(cfg.data, cfg.loader, table, "train")
    s3_proxy.reset()
    clear_header_cache()  # a fresh worker process
    reader = BlockReader(
        cfg.data, cfg.transform.model_copy(update={"zscore": False}), cfg.loader, plan, None
    )
    batch, bad = reader.read_block(0, epoch=0)
    assert not bad and len(batch["image"]) == len(plan.blocks[0])
    assert not [r.key for r in s3_proxy.gets(".zattrs") if ARRAY_HEADER.search(r.key)]
    assert [r for r in s3_proxy.gets() if r.key.endswith(".0.0")]  # chunks did come over S3
    # Each sample's DEG_COR is the stored entry of its frame (zarr's own attrs).
    ci = cfg.data.channels.index("171A")
    deg = zarr.open_array(synth_root / "sdomlv2.zarr" / "2012" / "171A", mode="r").attrs["DEG_COR"]
    rows = plan.windows[batch["sample"]]
    want = np.array(deg, np.float32)[plan.idx["171A"][rows]]
    np.testing.assert_allclose(batch["deg_cor"][:, ci], want, rtol=1e-6)
    hmi = cfg.data.channels.index("Bz")
    assert (batch["deg_cor"][:, hmi] == 1).all()


def test_data_info_reads_only_the_years_asked_for(s3_root, s3_proxy, tmp_path):
    root = s3_root.replace("/sdoml", "/two-years")
    args = _args(root, s3_proxy.url, tmp_path, "data.hmi_channels=[]")
    clear_header_cache()
    r = runner.invoke(app, ["data", "info", *args, "data.start=2013-01-01", "--json"])
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.output)["aia"]["years"]) == ["2013"]
    keys = _header_gets(s3_proxy)
    assert keys and all("/2013/" in k for k in keys), keys
    s3_proxy.reset()
    r = runner.invoke(app, ["data", "info", *args, "--json"])
    assert list(json.loads(r.output)["aia"]["years"]) == ["2012", "2013"]


@pytest.mark.ray
def test_data_stats_over_s3(s3_root, s3_server, shared_cache, ray_session, synth_root, tmp_path):
    args = _args(s3_root, s3_server.url, shared_cache, "transform.stats_samples=32")
    r = runner.invoke(app, ["data", "stats", *args])
    assert r.exit_code == 0, r.output
    assert re.search(r"statistics of \d+ train samples", r.output)
    stats = json.loads(next((shared_cache / "cache").glob("stats-*.json")).read_text())
    assert set(stats["channels"]) == set(load_config(None, args).data.channels)
    # The same numbers as the same statistics of the local copy of the bucket's archive.
    local = load_config(
        None,
        [
            *SMALL,
            f"data.root={synth_root}",
            f"data.cache_dir={tmp_path}",
            "transform.stats_samples=32",
        ],
    )
    table, _ = load_or_build_index(local.data)
    expected = load_or_compute_stats(local.data, local.transform, local.loader, table)
    assert stats["channels"].keys() == expected["channels"].keys()
    for c, got in stats["channels"].items():
        for k in ("mean", "std"):
            assert got[k] == pytest.approx(expected["channels"][c][k], rel=1e-6), (c, k)


@pytest.mark.ray
def test_mae_debug_pretraining_reads_through_s3(
    s3_root, s3_proxy, shared_cache, tmp_path, ray_session
):
    from sdofm.pretraining import pretrain

    cfg = load_config(
        None,
        _args(
            s3_root,
            s3_proxy.url,
            shared_cache,
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.system_metrics=false",
            "model.name=mae_debug",
            "loader.readers=1",
            "loader.block_size=8",
            "loader.batch_size=8",
            "train.max_steps=3",
            "train.val_every=3",
            "train.checkpoint_every=3",
            "train.val_samples=8",
            "transform.stats_samples=32",
            "scaling.cpus_per_worker=0.25",
        ),
    )
    load_or_build_index(cfg.data)  # up to date before the run (each header fetched once)
    s3_proxy.reset()
    clear_header_cache()
    result = pretrain(cfg)
    assert result.metrics["step"] == 3 and np.isfinite(result.metrics["train/loss"])
    # On an up-to-date index no header is fetched: not by the driver, not by the Ray readers.
    assert not _header_gets(s3_proxy), _header_gets(s3_proxy)
    assert len([r for r in s3_proxy.gets() if r.key.endswith(".0.0")]) > 10


@pytest.mark.ray
def test_dimming_sweep_reads_through_s3(s3_root, s3_server, shared_cache, tmp_path, ray_session):
    from sdofm.finetuning.tune import sweep
    from tests.finetuning.test_dimming import _checkpoint

    _checkpoint(tmp_path / "backbone", channels=load_config().data.channels)
    cfg = load_config(
        None,
        _args(
            s3_root,
            s3_server.url,
            shared_cache,
            "transform.stats_samples=32",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"finetune.backbone={tmp_path / 'backbone'}",
            "finetune.epochs=1",
            "finetune.max_train_samples=32",
            "loader.readers=1",
            "scaling.cpus_per_worker=0.25",
            "tune.grace_period=1",
        ),
    )
    result = sweep(cfg, "dimming", num_samples=1, max_concurrent=1)
    assert result.best is not None and result.best["status"] == "finished"
    assert np.isfinite(result.best["test/mae"])


# --------------------------------------------------------------------------- unreachable


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdofm.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_unreachable_store_is_one_line_naming_url_and_cause(s3_server, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    opts = json.dumps(storage_options(closed, anon=True))
    p = _cli(
        "data",
        "index",
        "data.root=s3://sdofm-nowhere/x",
        "data.aia_store=sdomlv2.zarr",
        f"data.storage_options={opts}",
        f"data.cache_dir={tmp_path}",
    )
    out = p.stdout + p.stderr
    assert p.returncode == 2
    assert out.splitlines() == [
        "error: cannot open s3://sdofm-nowhere/x/sdomlv2.zarr: EndpointConnectionError: "
        f'Could not connect to the endpoint URL: "{closed}/sdofm-nowhere/x/sdomlv2.zarr/.zgroup"'
    ], out

    opts = json.dumps(storage_options(s3_server.url, anon=True))
    p = _cli(
        "data", "info", "data.root=s3://sdofm-no-such-bucket/sdoml", f"data.storage_options={opts}"
    )
    out = p.stdout + p.stderr
    assert p.returncode == 2
    assert out.splitlines() == [
        "error: no AIA store under s3://sdofm-no-such-bucket/sdoml (looked for sdomlv2.zarr, "
        "sdomlv2_small.zarr, AIA.zarr): s3://sdofm-no-such-bucket/sdoml does not exist; "
        "set data.aia_store or data.root"
    ], out

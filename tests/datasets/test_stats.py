import json
from pathlib import Path

import numpy as np
import pytest

from sdofm.datasets.index import build_index, load_or_build_index
from sdofm.datasets.pipeline import SDOMLPipeline
from sdofm.datasets.stats import load_or_compute_stats
from tests.conftest import small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def test_zscored_train_split_is_standardised(synth_root, tmp_path):
    cfg = small_config(
        synth_root,
        f"data.cache_dir={tmp_path}",
        "transform.stats_samples=100000",
        "loader.block_size=16",
    )
    table, _ = load_or_build_index(cfg.data)
    stats = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
    pipe = SDOMLPipeline(cfg.data, cfg.transform, cfg.loader, table, stats)
    assert set(stats["channels"]) == set(cfg.data.channels)
    s171 = stats["channels"]["171A"]
    assert s171["count"] == stats["samples"] * 32 * 32
    p = s171["percentiles"]
    assert s171["min"] <= p["0.5"] <= p["50"] <= p["99.5"] <= s171["max"]
    x = np.concatenate([b["image"] for b in pipe.dataset("train").iter_batches(batch_size=16)])
    v = np.moveaxis(x, 1, 0).reshape(12, -1).astype(np.float64)
    # AIA is standardised with the train statistics; HMI has one fixed physical scale
    # (transform.magnetogram=fixed), which keeps it within [-1, 1].
    aia = [i for i, c in enumerate(cfg.data.channels) if c in cfg.data.aia_channels]
    hmi = [i for i, c in enumerate(cfg.data.channels) if c in cfg.data.hmi_channels]
    assert len(aia) == 9 and len(hmi) == 3
    np.testing.assert_allclose(v[aia].mean(axis=1), 0, atol=1e-3)
    np.testing.assert_allclose(v[aia].std(axis=1), 1, atol=1e-3)
    assert np.abs(v[hmi]).max() <= 1 + 1e-6 and (v[hmi].std(axis=1) > 1e-3).all()


def test_stats_are_reused_and_rebuilt_when_stale(synth_root, tmp_path):
    cfg = small_config(synth_root, f"data.cache_dir={tmp_path}", "transform.stats_samples=50")
    table, _ = build_index(cfg.data)
    first = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
    assert first["samples"] == 50
    path = Path(first["path"])
    stamp = path.stat().st_mtime_ns
    again = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
    assert (
        path.stat().st_mtime_ns == stamp
        and again["channels"] == json.loads(path.read_text())["channels"]
    )
    masked = small_config(
        synth_root,
        f"data.cache_dir={tmp_path}",
        "transform.stats_samples=50",
        "transform.limb=mask_off_disk",
    )
    other = load_or_compute_stats(masked.data, masked.transform, masked.loader, table)
    assert other["path"] != first["path"]
    assert other["channels"]["171A"]["mean"] != first["channels"]["171A"]["mean"]
    assert other["provenance"]["transform"]["limb"] == "mask_off_disk"
    # a different index (one day less) is stale too
    fewer = table[table.time < table.time.max() - np.timedelta64(1, "D")]
    assert (
        load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, fewer)["path"] != first["path"]
    )

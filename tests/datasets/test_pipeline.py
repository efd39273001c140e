import threading

import numpy as np
import pytest
import zarr

from sdofm.datasets.blocks import make_preprocessor
from sdofm.datasets.index import build_index, load_or_build_index
from sdofm.datasets.pipeline import SDOMLPipeline
from sdofm.datasets.sdoml import FrameError
from sdofm.datasets.stats import load_or_compute_stats
from tests.conftest import small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def _cfg(root, tmp_path, *extra):
    return small_config(
        root,
        f"data.cache_dir={tmp_path / 'cache'}",
        "loader.block_size=8",
        "loader.readers=1",
        "loader.shuffle_buffer=0",
        "data.split.buffer=0s",
        *extra,
    )


def _pipe(cfg, table=None) -> SDOMLPipeline:
    """The pipeline as a driver builds it: the index, then the statistics when z-scoring."""
    if table is None:
        table, _ = load_or_build_index(cfg.data)
    stats = None
    if cfg.transform.zscore:
        stats = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
    return SDOMLPipeline(cfg.data, cfg.transform, cfg.loader, table, stats)


def _direct(archive, plan, pre, channels, sample) -> np.ndarray:
    """One sample's image read frame by frame through the stores and transformed whole:
    the reference the batches must equal."""
    rows = plan.windows[sample]
    cube = np.stack(
        [
            np.stack(
                [
                    (archive.aia if c.endswith("A") else archive.hmi).read_frames(
                        str(plan.year[c][r]), c, [plan.idx[c][r]]
                    )[0]
                    for r in rows
                ]
            )
            for c in channels
        ]
    )  # (C, T, H, W)
    return pre(cube)


def _ids(ds, **kw):
    return [int(i) for b in ds.iter_batches(batch_size=8, **kw) for i in b["sample"]]


def test_batches_shapes_dtypes_and_finiteness(synth_root, tmp_path):
    cfg = _cfg(
        synth_root,
        tmp_path,
        "data.num_frames=2",
        "data.frame_step=1h",
        "data.eve_lines=[He II, Fe XVIII]",
        "transform.size=16",
        "transform.dtype=float16",
    )
    pipe = _pipe(cfg)
    n = pipe.num_samples("val")
    assert n > 0
    batches = list(pipe.dataset("val").iter_batches(batch_size=4))
    b = batches[0]
    assert b["image"].shape[1:] == (12, 2, 16, 16) and b["image"].dtype == np.float16
    assert b["time"].shape[1:] == (2,) and (np.diff(b["time"], axis=1) == 3600 * 10**9).all()
    assert b["eve"].shape[1:] == (2, 2) and (b["eve"] >= 0).all()
    assert (
        b["deg_cor"].shape[1:] == (12, 2)
        and (b["deg_cor"][:, 9:] == 1).all()
        and (b["deg_cor"][:, :9] < 1).all()
    )
    assert sum(len(x["image"]) for x in batches) == n
    assert all(np.isfinite(x["image"].astype(np.float32)).all() for x in batches)


def test_zscore_without_statistics_is_refused(tmp_path):
    cfg = _cfg(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="load_or_compute_stats"):
        SDOMLPipeline(cfg.data, cfg.transform, cfg.loader)


def test_every_sample_once_per_epoch_in_a_new_reproducible_order(synth_root, tmp_path):
    pipe = _pipe(_cfg(synth_root, tmp_path))
    n = pipe.num_samples("train")
    e0, e1 = _ids(pipe.dataset("train", epoch=0)), _ids(pipe.dataset("train", epoch=1))
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert e0 != e1
    assert _ids(pipe.dataset("train", epoch=0)) == e0  # reproducible from the seed
    other = _pipe(_cfg(synth_root, tmp_path, "loader.seed=7"))
    assert _ids(other.dataset("train", epoch=0)) != e0
    # An open-ended dataset: each pass is the next epoch, in the same orders.
    ds = pipe.dataset("train")
    assert _ids(ds) == e0 and _ids(ds) == e1
    # Validation is read in store order, the same every time.
    val = pipe.dataset("val")
    assert _ids(val) == _ids(val)


def test_streaming_split_is_disjoint_and_complete(synth_root, tmp_path):
    pipe = _pipe(_cfg(synth_root, tmp_path, "loader.readers=2"))
    n = pipe.num_samples("train")
    shards = pipe.dataset("train").streaming_split(2, equal=False)
    seen = [[], []]

    def consume(k):
        for _ in range(2):
            seen[k].append(_ids(shards[k]))

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    for epoch in range(2):
        a, b = set(seen[0][epoch]), set(seen[1][epoch])
        assert a and b and not (a & b)
        assert sorted(seen[0][epoch] + seen[1][epoch]) == list(range(n))


def _damage(root, table):
    """NaN, all-zero and corrupt-chunk frames among those the index uses; returns the hit
    rows and, by frame, the reason each should be skipped for."""
    used = np.sort(table.loc[table["171A_year"] == 2012, "171A_idx"].to_numpy())
    nan_idx, zero_idx, chunk = int(used[1]), int(used[2]), int(used[40]) // 8
    a = zarr.open_array(root / "sdomlv2.zarr" / "2012" / "171A", mode="r+", zarr_format=2)
    for i, value in ((nan_idx, np.nan), (zero_idx, 0.0)):
        lo = i // 8 * 8
        block = a[lo : lo + 8]
        block[i - lo] = value
        a[lo : lo + 8] = block
    (root / "sdomlv2.zarr" / "2012" / "171A" / f"{chunk}.0.0").write_bytes(b"corrupt")
    idx = table["171A_idx"]
    hit = set(
        np.flatnonzero(
            (table["171A_year"] == 2012) & (idx.isin([nan_idx, zero_idx]) | (idx // 8 == chunk))
        )
    )
    why = {int(i): f"cannot decode chunk {chunk}.0.0" for i in idx.iloc[sorted(hit)]}
    why.update({nan_idx: "non-finite pixels", zero_idx: "all zero"})
    return hit, why


def test_bad_frames_are_skipped_and_reported_once(synth_copy, tmp_path):
    cfg = _cfg(synth_copy, tmp_path, "transform.zscore=false")
    table, _ = build_index(cfg.data)
    hit, why = _damage(synth_copy, table)
    # By hand: the damaged frames the index points at, and the samples (T=1: rows) per split.
    frames = set(table.loc[sorted(hit), "171A_idx"].tolist())
    assert frames == set(why)
    lost = table.loc[sorted(hit), "split"].astype(str).value_counts().to_dict()
    pipe = _pipe(cfg, table)
    # The blocks that lost samples are shorter and wait in Ray's output buffer for the next
    # block of their read task: their images must still be theirs (compared with the
    # stores' own read in each split's first epoch).
    from sdofm.datasets.sdoml import Archive

    archive = Archive.open(cfg.data)
    pre = make_preprocessor(cfg.data.channels, cfg.transform, 32, None)
    total, delivered, checked = 0, 0, 0
    for split in ("train", "val", "test"):
        total += pipe.num_samples(split)
        ds, plan = pipe.dataset(split), pipe.plan(split)
        for epoch in range(2 if split == "train" else 1):  # two epochs of train: no duplicates
            n = 0
            for b in ds.iter_batches(batch_size=8):
                n += len(b["image"])
                assert np.isfinite(b["image"]).all()
                for j, sample in enumerate(b["sample"] if epoch == 0 else ()):
                    ref = _direct(archive, plan, pre, cfg.data.channels, sample)
                    np.testing.assert_allclose(b["image"][j], ref, rtol=1e-5, atol=1e-5)
                    checked += 1
            assert n == pipe.num_samples(split) - lost.get(split, 0)
        delivered += n
    assert checked == delivered
    assert len(hit) >= 4 and delivered == total - len(hit)
    report = pipe.skipped()
    assert report.num_frames == len(frames) and {k[3] for k in report.frames} == frames
    assert all(k[1:3] == ("2012", "171A") for k in report.frames)
    assert report.num_samples() == len(hit)
    assert {s: report.num_samples(s) for s in lost} == lost
    assert pipe.skipped("val").num_samples() == lost.get("val", 0)
    assert all(r["reason"].startswith(why[r["frame"]]) for r in report.rows())


def test_bad_frames_raise_when_asked(synth_copy, tmp_path):
    cfg = _cfg(synth_copy, tmp_path, "transform.zscore=false", "loader.on_bad_frame=raise")
    table, _ = build_index(cfg.data)
    hit, _ = _damage(synth_copy, table)
    pipe = _pipe(cfg, table)
    with pytest.raises(FrameError, match=r"2012/171A frame \d+") as e, pipe.frame_errors():
        for split in ("train", "val", "test"):
            for _ in pipe.dataset(split).iter_batches(batch_size=8):
                pass
    assert e.value.index in set(table.loc[sorted(hit), "171A_idx"].tolist())


def test_torch_trainer_workers_get_disjoint_shards(synth_root, tmp_path):
    import json

    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    pipe = _pipe(_cfg(synth_root, tmp_path))
    n = pipe.num_samples("train")
    out = tmp_path / "seen"
    out.mkdir()

    def loop(config):
        ctx = ray.train.get_context()
        shard = ray.train.get_dataset_shard("train")
        for epoch in range(2):
            ids = [int(i) for b in shard.iter_torch_batches(batch_size=8) for i in b["sample"]]
            (out / f"{ctx.get_world_rank()}-{epoch}.json").write_text(json.dumps(ids))

    TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        datasets={"train": pipe.dataset("train")},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="shards"),
    ).fit()
    for epoch in range(2):
        a, b = (json.loads((out / f"{r}-{epoch}.json").read_text()) for r in (0, 1))
        assert not set(a) & set(b)
        # DDP shards are equalised: at most world_size - 1 samples are left out.
        assert len(a) == len(b) and n - 1 <= len(a) + len(b) <= n and len(set(a + b)) == len(a + b)


def test_images_equal_a_direct_read_and_transform(synth_root, tmp_path):
    from sdofm.datasets.sdoml import Archive

    cfg = _cfg(
        synth_root,
        tmp_path,
        "loader.readers=2",
        "loader.block_size=4",
        "data.num_frames=2",
        "data.frame_step=24min",
    )
    pipe = _pipe(cfg)
    plan = pipe.plan("train")
    archive = Archive.open(cfg.data)
    pre = make_preprocessor(cfg.data.channels, cfg.transform, 32, pipe.stats)
    checked = 0
    for b in pipe.dataset("train").iter_batches(batch_size=5):  # crosses block boundaries
        for j, sample in enumerate(b["sample"]):
            ref = _direct(archive, plan, pre, cfg.data.channels, sample)
            np.testing.assert_allclose(b["image"][j], ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(b["time"][j], plan.time[plan.windows[sample]])
            checked += 1
    assert checked == plan.num_samples


@pytest.mark.parametrize("blocks_per_read", [1, 3])
def test_one_ray_block_per_reader_block_and_batches_within_one(
    synth_root, tmp_path, blocks_per_read
):
    """Ray Data neither splits the readers' blocks nor joins them: each Ray block is one
    block of the plan, whole, and batches of the block size never span two."""
    cfg = _cfg(
        synth_root, tmp_path, "loader.readers=2", f"loader.blocks_per_read={blocks_per_read}"
    )
    pipe = _pipe(cfg)
    plan = pipe.plan("train")
    ds = pipe.dataset("train", epoch=0)
    rows = [b.num_rows() for b in ds.iter_internal_ref_bundles()]
    assert len(rows) == len(plan.blocks) and sorted(rows) == sorted(len(b) for b in plan.blocks)
    assert "SplitBlocks" not in ds.stats(), ds.stats()
    block_of = {int(s): k for k, b in enumerate(plan.blocks) for s in plan.ids[b]}
    batches = list(pipe.dataset("train", epoch=0).iter_batches(batch_size=cfg.loader.block_size))
    for b in batches:
        assert len({block_of[int(s)] for s in b["sample"]}) == 1, b["sample"]
    assert sum(len(b["sample"]) for b in batches) == plan.num_samples

"""The block reader without Ray, against zarr's own read of the same frames and the
transforms of ``sdofm.datasets.transforms``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from sdofm.constants import disk_radius_px
from sdofm.datasets import transforms as T
from sdofm.datasets.blocks import (
    BlockReader,
    SplitPlan,
    frame_checks,
    physical_transform,
    plan_split,
)
from sdofm.datasets.index import build_index
from sdofm.datasets.sdoml import FrameError
from tests.conftest import small_config

CHUNK = 8  # synth.frames_per_chunk of the session store
SUBSET = np.arange(40)  # the first 40 train samples: 5 blocks of 8


def _cfg(root, *extra):
    return small_config(
        root,
        "loader.block_size=8",
        "data.num_frames=2",
        "data.frame_step=24min",
        "data.split.buffer=0s",
        "transform.size=16",  # area-averaged from the stored 32 px
        *extra,
    )


def _stats(channels) -> dict:
    return {
        "channels": {c: {"mean": 0.1 * i, "std": 1.0 + 0.1 * i} for i, c in enumerate(channels)}
    }


def _array(root: Path, channel: str, year: int, mode: str = "r"):
    store = "sdomlv2_hmi.zarr" if channel in ("Bx", "By", "Bz") else "sdomlv2.zarr"
    return zarr.open_array(root / store / str(year) / channel, mode=mode, zarr_format=2)


def _reference(root: Path, cfg, plan: SplitPlan, sample: int, stats: dict | None) -> np.ndarray:
    """``(C, T, S, S)``: the sample's frames read one by one with zarr, then downsampled,
    limb-handled, scaled and z-scored with the functions of transforms.py."""
    channels, t = cfg.data.channels, cfg.transform
    rows = plan.windows[sample]
    cube = np.stack(
        [
            np.stack([_array(root, c, plan.year[c][r])[int(plan.idx[c][r])] for r in rows])
            for c in channels
        ]
    )
    if t.size:
        cube = T.downsample_to(cube, t.size)
    mags = [c in T.MAGNETOGRAM_CHANNELS for c in channels]
    cube = T.apply_limb(cube, t.limb, mags, disk_radius_px(cube.shape[-1]))
    cube = T.scale(cube, *T.scaling_params(channels))
    if stats is None:
        return cube
    # AIA standardised with the statistics; HMI (transform.magnetogram: fixed) divided by
    # its scaled clip value, asinh(1500 G / 50 G).
    fixed = np.arcsinh(1500.0 / 50.0)
    mean = [0.0 if c in T.MAGNETOGRAM_CHANNELS else stats["channels"][c]["mean"] for c in channels]
    std = [fixed if c in T.MAGNETOGRAM_CHANNELS else stats["channels"][c]["std"] for c in channels]
    return T.zscore(cube, mean, std)


def _spans_chunks(plan: SplitPlan, block: int, channel: str) -> bool:
    """Whether the frames ``channel`` contributes to ``block`` lie in more than one chunk."""
    rows = plan.windows[plan.blocks[block]]
    return (
        len(
            np.unique(
                plan.year[channel][rows].astype(np.int64) * 10**6 + plan.idx[channel][rows] // CHUNK
            )
        )
        > 1
    )


def test_read_block_equals_zarr_read_and_transforms(synth_root):
    cfg = _cfg(synth_root)
    table, _ = build_index(cfg.data)
    plan = plan_split(cfg.data, cfg.loader, table, "train", SUBSET)
    stats = _stats(cfg.data.channels)
    reader = BlockReader(cfg.data, cfg.transform, cfg.loader, plan, stats)
    assert len(plan.blocks) == 5 and any(_spans_chunks(plan, b, "171A") for b in range(5))
    for b in range(len(plan.blocks)):
        batch, bad = reader.read_block(b, epoch=0)
        assert bad == []
        assert sorted(batch["sample"]) == sorted(plan.blocks[b])  # each sample once
        assert batch["image"].shape == (8, 12, 2, 16, 16) and batch["image"].dtype == np.float32
        for j, s in enumerate(batch["sample"]):
            rows = plan.windows[s]
            want = _reference(synth_root, cfg, plan, s, stats)
            np.testing.assert_allclose(batch["image"][j], want, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(batch["time"][j], plan.time[rows])
            for ci, c in enumerate(cfg.data.channels):
                deg = [
                    _array(synth_root, c, plan.year[c][r]).attrs["DEG_COR"][plan.idx[c][r]]
                    if c.endswith("A")
                    else 1.0
                    for r in rows
                ]
                np.testing.assert_allclose(batch["deg_cor"][j, ci], deg, rtol=1e-6)


def test_train_blocks_leave_in_a_seeded_order(synth_root):
    cfg = _cfg(synth_root)
    table, _ = build_index(cfg.data)
    plan = plan_split(cfg.data, cfg.loader, table, "train", SUBSET)
    reader = BlockReader(cfg.data, cfg.transform, cfg.loader, plan, _stats(cfg.data.channels))
    e0 = reader.read_block(1, epoch=0)[0]["sample"].copy()
    e1 = reader.read_block(1, epoch=1)[0]["sample"].copy()
    assert sorted(e0) == sorted(e1) and not np.array_equal(e0, e1)
    np.testing.assert_array_equal(reader.read_block(1, epoch=0)[0]["sample"], e0)


def test_a_nan_frame_drops_the_samples_that_use_it(synth_copy):
    cfg = _cfg(synth_copy, "transform.zscore=false")
    table, _ = build_index(cfg.data)
    plan = plan_split(cfg.data, cfg.loader, table, "train", SUBSET)
    block = next(b for b in range(len(plan.blocks)) if _spans_chunks(plan, b, "171A"))
    rows = plan.windows[plan.blocks[block]]
    year, idx = int(plan.year["171A"][rows[3, 0]]), int(plan.idx["171A"][rows[3, 0]])
    a = _array(synth_copy, "171A", year, mode="r+")
    lo = idx // CHUNK * CHUNK
    chunk = a[lo : lo + CHUNK]
    chunk[idx - lo] = np.nan
    a[lo : lo + CHUNK] = chunk  # the whole chunk: no partial-chunk write
    uses = (plan.year["171A"][rows] == year) & (plan.idx["171A"][rows] == idx)
    hit = set(plan.blocks[block][uses.any(axis=1)].tolist())

    reader = BlockReader(cfg.data, cfg.transform, cfg.loader, plan, None)
    batch, bad = reader.read_block(block, epoch=0)
    assert hit and set(batch["sample"].tolist()) == set(plan.blocks[block].tolist()) - hit
    assert len(bad) == 1  # one frame, named once, with every sample it cost
    s = bad[0]
    assert (s.year, s.channel, s.frame, s.reason) == (str(year), "171A", idx, "non-finite pixels")
    assert s.store.endswith("sdomlv2.zarr") and s.split == "train" and set(s.samples) == hit
    assert np.isfinite(batch["image"]).all()
    for j, s in enumerate(batch["sample"]):
        want = _reference(synth_copy, cfg, plan, s, None)
        np.testing.assert_allclose(batch["image"][j], want, rtol=1e-5, atol=1e-5)

    strict = cfg.loader.model_copy(update={"on_bad_frame": "raise"})
    with pytest.raises(FrameError, match=rf"{year}/171A frame {idx}"):
        BlockReader(cfg.data, cfg.transform, strict, plan, None).read_block(block, epoch=0)


def test_frame_checks_name_each_unusable_frame():
    frames = np.ones((4, 3, 3), np.float32)
    frames[1, 0, 0] = np.nan
    frames[2] = 0
    frames[3, 2, 2] = np.inf
    assert frame_checks(frames) == [None, "non-finite pixels", "all zero", "non-finite pixels"]


def test_physical_transform_keeps_units_and_nothing_else():
    t = small_config("unused", "transform.size=16", "transform.limb=mask_off_disk").transform
    channels = ["171A", "Bz"]
    p = physical_transform(t, channels)
    assert p.scaling == {"171A": ("linear", None, None), "Bz": ("linear", None, None)}
    assert (p.zscore, p.dtype, p.size, p.limb) == (False, "float32", 16, "mask_off_disk")
    assert t.zscore and t.scaling == {}  # the caller's section is left alone


def test_blocks_read_in_store_order_decode_a_shared_chunk_once(synth_root):
    # One frame per sample: a block needs no frame before its predecessor's last one.
    cfg = _cfg(synth_root, "data.num_frames=1")
    table, _ = build_index(cfg.data)
    plan = plan_split(cfg.data, cfg.loader, table, "train", SUBSET)
    stats = _stats(cfg.data.channels)

    def read(order):
        reader = BlockReader(cfg.data, cfg.transform, cfg.loader, plan, stats)
        store, calls = reader.stores["171A"], []
        read_frames = store.read_frames

        def counting(year, channel, idx, **kw):  # the real read, recorded
            if channel == "171A":
                calls.append((year, set((np.asarray(idx) // CHUNK).tolist())))
            return read_frames(year, channel, idx, **kw)

        store.read_frames = counting
        out = {b: reader.read_block(b, epoch=0)[0]["image"].copy() for b in order}
        store.read_frames = read_frames
        # how often each chunk was decoded
        counts: dict = {}
        for year, chunks in calls:
            for k in chunks:
                counts[(year, k)] = counts.get((year, k), 0) + 1
        return out, counts

    forward, once = read(range(5))
    backward, again = read(reversed(range(5)))
    for b in range(5):  # the same samples whichever order (tails never change a value)
        np.testing.assert_array_equal(forward[b], backward[b])
    assert set(once) == set(again) and max(once.values()) == 1  # in order: each chunk once
    assert max(again.values()) > 1  # out of order, a shared chunk is decoded again

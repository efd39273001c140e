"""``transform.on: device``: readers that only decode, then the torch transform, against
zarr's own read of the same frames put through the numpy functions of transforms.py."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from sdofm.constants import disk_radius_px
from sdofm.datasets import transforms as T
from sdofm.datasets.blocks import BlockReader, make_preprocessor, plan_split
from sdofm.datasets.device import DeviceTransform
from sdofm.datasets.index import build_index
from tests.datasets.test_blocks import SUBSET, _array, _cfg, _stats

# Clip bounds inside the synthetic archive's ranges, so clipping changes pixels; every
# scaling method on at least one channel.
SCALING = (
    "transform.scaling={171A: [sqrt, 100.0, 2000.0], 193A: [asinh, null, 3000.0], "
    "304A: [linear, 5.0, 300.0], Bz: [linear, -300.0, 300.0]}"
)


def _numpy_reference(root, cfg, plan, sample, pre):
    """``(C, T, S, S)``: zarr frames -> downsample -> limb -> scale -> z-score (transforms.py),
    with the parameters (clip values, softening, statistics) of the preprocessor ``pre``."""
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
    cube = T.scale(cube, pre.methods, pre.clip_min, pre.clip_max, pre.softening)
    if pre.mean is None:
        return cube
    return T.zscore(cube, pre.mean, pre.std)


@pytest.mark.parametrize(
    "extra",
    [
        ("transform.limb=keep_corona", SCALING),  # stats below: z-scored, resized to 16 px
        ("transform.limb=mask_off_disk", "transform.zscore=false", "transform.size=null"),
    ],
    ids=["keep_corona-zscore-16px", "mask_off_disk-32px"],
)
def test_device_transform_equals_the_numpy_transforms(synth_root, extra):
    cfg = _cfg(synth_root, "transform.on=device", *extra)
    t = cfg.transform
    table, _ = build_index(cfg.data)
    plan = plan_split(cfg.data, cfg.loader, table, "train", SUBSET)
    stats = _stats(cfg.data.channels) if t.zscore else None
    reader = BlockReader(cfg.data, t, cfg.loader, plan, stats)
    size = t.size or reader.stored_size
    pre = make_preprocessor(cfg.data.channels, t, size, stats)
    device = pickle.loads(pickle.dumps(DeviceTransform(pre)))  # as it reaches a Ray worker
    clipped = 0
    for b in (0, 3):
        batch, bad = reader.read_block(b, epoch=0)
        assert bad == [] and batch["image"].dtype == np.float32
        raw = torch.from_numpy(batch["image"].copy())
        got = device(raw).numpy()
        np.testing.assert_array_equal(raw.numpy(), batch["image"])  # input left alone
        for j, s in enumerate(batch["sample"]):
            want = _numpy_reference(synth_root, cfg, plan, s, pre)
            lo, hi = pre.clip_min, pre.clip_max
            # The reader emitted physical units (only area-averaged) ...
            phys = batch["image"][j]
            assert np.isfinite(got[j]).all()
            # ... and the device finished them as the CPU would.
            np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-5)
            for ci in range(len(lo)):
                lo_, hi_ = lo[ci], hi[ci]
                below = (phys[ci] < lo_).sum() if lo_ is not None else 0
                above = (phys[ci] > hi_).sum() if hi_ is not None else 0
                clipped += int(below + above)
    assert clipped > 0  # the clipping was exercised, not only the smooth part


def test_device_transform_needs_the_output_size():
    cfg = _cfg("unused", "transform.on=device")
    pre = make_preprocessor(cfg.data.channels, cfg.transform, 32, None)  # 32 px -> 16 px
    with pytest.raises(ValueError, match="resizing stays on the readers"):
        DeviceTransform(pre)

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
from sdofm.datasets.device import DeviceTransform, PinnedCopies
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


def test_float16_physical_units_match_float32_within_float16_rounding(synth_root):
    """``transform.dtype: float16`` with ``on: device``: the readers send physical units
    clipped to each channel's bounds and scaled by 2**-k in float16; restored on the
    device they equal the float32 path's clipped units within float16's rounding
    (2**-11 relative), and the model inputs within that error carried through the
    scaling (log: log10(1 + 2**-11), asinh: 2**-11) and the z-score."""
    cfg32 = _cfg(synth_root, "transform.on=device", "transform.size=null")
    cfg16 = _cfg(
        synth_root, "transform.on=device", "transform.size=null", "transform.dtype=float16"
    )
    table, _ = build_index(cfg32.data)
    plan = plan_split(cfg32.data, cfg32.loader, table, "train", SUBSET)
    stats = _stats(cfg32.data.channels)
    r32 = BlockReader(cfg32.data, cfg32.transform, cfg32.loader, plan, stats)
    r16 = BlockReader(cfg16.data, cfg16.transform, cfg16.loader, plan, stats)
    pre = make_preprocessor(cfg32.data.channels, cfg32.transform, r32.stored_size, stats)
    device = DeviceTransform(pre)
    k = np.array(T.wire_exponents(pre.channels, pre.clip_min, pre.clip_max))
    lo, hi = np.array(pre.clip_min), np.array(pre.clip_max)
    assert np.all(np.maximum(abs(lo), abs(hi)) * 2.0**-k <= 2**15)  # inside float16's range
    for b in (0, 3):
        x32 = r32.read_block(b, epoch=0)[0]["image"].copy()
        x16 = r16.read_block(b, epoch=0)[0]["image"].copy()
        assert x16.dtype == np.float16 and x16.nbytes * 2 == x32.nbytes
        shape = (1, -1, 1, 1, 1)
        restored = x16.astype(np.float32) * 2.0 ** k.reshape(shape)
        clipped = np.clip(x32, lo.reshape(shape), hi.reshape(shape))
        # float16's rounding: 2**-11 relative in its normal range, 2**-25 * 2**k below it.
        tol = 2.0**-11 * np.abs(clipped) + 2.0 ** (k.reshape(shape) - 25)
        assert np.all(np.abs(restored - clipped) <= tol)
        got, want = device(torch.from_numpy(x16)).numpy(), device(torch.from_numpy(x32)).numpy()
        for c, method in enumerate(pre.methods):
            carried = {"log": np.log10(1 + 2.0**-11), "asinh": 2.0**-11}[method]
            bound = carried / pre.std[c] + 1e-5
            assert np.abs(got[:, c] - want[:, c]).max() <= bound, (pre.channels[c], method)


def test_float16_physical_units_need_both_clip_bounds(synth_root):
    cfg = _cfg(synth_root, "transform.on=device", "transform.dtype=float16", SCALING)
    table, _ = build_index(cfg.data)
    plan = plan_split(cfg.data, cfg.loader, table, "train", SUBSET)
    with pytest.raises(ValueError, match=r"channel 193A has \[None, 3000.0\]"):
        BlockReader(cfg.data, cfg.transform, cfg.loader, plan, _stats(cfg.data.channels))


def test_pinned_copies_pass_cpu_batches_through():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(PinnedCopies(torch.device("cpu"))(x), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_copies_keep_values_and_reuse_two_pinned_buffers():
    send = PinnedCopies(torch.device("cuda"))
    xs = [torch.randn(4, 3, 8, 8) for _ in range(5)]
    ys = [send(x) for x in xs]  # the fifth reuses the first buffer again
    torch.cuda.synchronize()
    for x, y in zip(xs, ys, strict=True):
        assert y.is_cuda and torch.equal(y.cpu(), x)
    ring = send._rings[((4, 3, 8, 8), torch.float32)]
    assert len(ring) == 2 and all(buf.is_pinned() for buf, _ in ring)

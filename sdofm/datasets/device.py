"""The model-input transforms of :mod:`sdofm.datasets.transforms` as torch ops, for the
training device (``transform.on: device``).

On a CPU the per-pixel transforms (limb, log/sqrt/asinh scaling, z-score) cost about
as much as decoding the frames, so readers that also transform need twice the cores
to feed a GPU; on the GPU they take microseconds. With ``transform.on: device`` the
readers only decode (and area-average to ``transform.size``, which is linear, comes
first in the chain and cuts the bytes moved) and emit float32 physical units; the
engine applies :class:`DeviceTransform` to each batch's image after moving it to the
device. Both paths run the same :class:`~sdofm.datasets.transforms.Preprocessor`
(one definition of the parameters) in the same order, so they agree within float32
rounding (tests/datasets/test_device.py).
"""

from __future__ import annotations

import numpy as np
import torch

from sdofm.config import DataConfig, TransformConfig
from sdofm.constants import disk_radius_px
from sdofm.datasets.blocks import make_preprocessor
from sdofm.datasets.transforms import Preprocessor, _zscore_params, disk_mask, wire_exponents


def device_transform(
    data: DataConfig, transform: TransformConfig, size: int, stats: dict | None
) -> DeviceTransform | None:
    """What the engine applies to each batch's image on the device: the model-input
    transforms of ``transform`` at ``size`` px when the readers only decode
    (``transform.on: device``); None otherwise (prepared shards are transformed)."""
    if transform.on != "device" or data.prepared:
        return None
    return DeviceTransform(make_preprocessor(data.channels, transform, size, stats))


class DeviceTransform:
    """``Preprocessor`` minus resizing and casting, on torch tensors of a whole batch.

    Picklable (it holds the preprocessor, not tensors), so it travels to Ray Train
    workers inside the loop config; the limb mask is built once per image size and device.
    """

    def __init__(self, pre: Preprocessor):
        if pre.out_size is not None:
            raise ValueError(
                "resizing stays on the readers: build the device transform for the "
                f"output size (out_size None), got out_size={pre.out_size}"
            )
        self.pre = pre
        n = len(pre.channels)
        self.plan = pre._plan(n)  # (method, lo, hi, softening) per channel, validated
        self.zscore = None
        if pre.mean is not None:
            m, s = _zscore_params(pre.mean, pre.std, n)  # float32, std floored as on the CPU
            self.zscore = [(float(a), float(b)) for a, b in zip(m, s, strict=True)]
        self._masks: dict[tuple, torch.Tensor] = {}
        self._wire: list[float] | None = None

    def _wire_scales(self) -> list[float]:
        """2**k per channel, undoing the readers' scale of float16 images (computed once)."""
        if self._wire is None:
            pre = self.pre
            self._wire = [2.0**k for k in wire_exponents(pre.channels, pre.clip_min, pre.clip_max)]
        return self._wire

    def __getstate__(self) -> dict:
        return {"pre": self.pre}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["pre"])

    def _off_disk(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._masks:
            radius = self.pre.radius_px
            radius = disk_radius_px(min(h, w)) if radius is None else radius
            off = ~disk_mask((h, w), radius)
            self._masks[key] = torch.from_numpy(np.ascontiguousarray(off)).to(device)
        return self._masks[key]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W) or (B, C, H, W) physical units (float32, or float16 as the readers
        send it: clipped, times 2**-k per channel) -> same shape float32, model-ready.

        The input is left as it is (the batch may be shared with a prefetcher).
        """
        pre = self.pre
        if x.shape[1] != len(pre.channels):
            raise ValueError(
                f"DeviceTransform has {len(pre.channels)} channels {pre.channels} but the "
                f"images have shape {tuple(x.shape)} (channel axis 1)"
            )
        y = x.to(torch.float32, copy=True)
        off = self._off_disk(*y.shape[-2:], y.device)
        # float16 images come clipped and scaled by 2**-k per channel (BlockReader).
        wire = self._wire_scales() if x.dtype == torch.float16 else None
        for c, (method, lo, hi, soft) in enumerate(self.plan):
            yc = y[:, c]
            if wire is not None:
                yc.mul_(wire[c])
            # Limb first, in physical units (as _apply_limb_): HMI has no data off the disk.
            if pre.limb == "mask_off_disk" or pre.is_magnetogram[c]:
                yc.masked_fill_(off, 0.0)
            if lo is not None or hi is not None:
                yc.clamp_(lo, hi)
            if method == "log":
                yc.log10_()
            elif method == "sqrt":
                yc.sqrt_()
            elif method == "asinh":
                yc.div_(soft).asinh_()
            if self.zscore is not None:
                mean, std = self.zscore[c]
                yc.sub_(mean).div_(std)
        return y


class PinnedCopies:
    """Host batches sent to a CUDA device through page-locked buffers kept between batches.

    A copy from pageable memory cannot overlap the GPU's work, and pinning each batch
    afresh (``Tensor.pin_memory()``, what Ray's ``pin_memory`` option does) allocates
    page-locked memory per batch, which costs more than the copy. Here each shape and
    dtype has ``slots`` pinned buffers used in turn; a buffer is written again only once
    the GPU has finished reading it. Other devices: a plain ``.to(device)``."""

    def __init__(self, device: torch.device, slots: int = 2):
        self.device, self.slots = torch.device(device), slots
        self._rings: dict[tuple, list[tuple[torch.Tensor, object]]] = {}
        self._turn: dict[tuple, int] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return x.to(self.device)
        key = (tuple(x.shape), x.dtype)
        ring = self._rings.setdefault(key, [])
        i = self._turn.get(key, 0)
        self._turn[key] = (i + 1) % self.slots
        if len(ring) <= i:
            pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            ring.append((pinned, torch.cuda.Event()))
        buf, done = ring[i]
        done.synchronize()  # the GPU has read what this buffer held last
        buf.copy_(x)
        y = buf.to(self.device, non_blocking=True)
        done.record()
        return y

"""Pure-numpy transforms for SDOML v2 image cubes.

Arrays are channel-first: ``(C, H, W)`` or ``(C, T, H, W)``; spatial axes are always the
last two. Per-channel parameters are indexed along axis 0. Everything is computed in
float32. Public functions never modify their input; ``Preprocessor`` makes one working copy
and then works in place.

Order of operations in a pipeline: physical units first (exposure, dimming,
downsampling, limb), then the non-linear scaling, then the z-score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from sdofm.constants import MIN_EXPTIME, disk_radius_px

PerChannel = float | Sequence[float] | np.ndarray
OptionalPerChannel = float | Sequence[float | None] | np.ndarray | None
Methods = str | Sequence[str]

SCALING_METHODS = ("linear", "log", "sqrt", "asinh")
LIMB_MODES = ("keep_corona", "mask_off_disk")
MAGNETOGRAM_CHANNELS = frozenset({"Bx", "By", "Bz"})

STD_FLOOR = 1e-6  # z-score divides by max(std, STD_FLOOR) so constant channels stay finite

MAGNETOGRAM_SOFTENING_G = 50.0
"""asinh(B / 50 G): linear through the quiet network, logarithmic in active regions, so that
a month of strong fields does not dominate a loss (Surya compresses HMI with a signed log)."""

# channel -> (method, clip_min, clip_max), in DN/s for AIA and Gauss for HMI.
DEFAULT_SCALING: dict[str, tuple[str, float, float]] = {
    "94A": ("log", 0.1, 800.0),
    "131A": ("log", 0.7, 1900.0),
    "171A": ("log", 5.0, 3500.0),
    "193A": ("log", 20.0, 5500.0),
    "211A": ("log", 7.0, 3500.0),
    "304A": ("log", 0.1, 3500.0),
    "335A": ("log", 0.4, 1000.0),
    "1600A": ("log", 10.0, 800.0),
    "1700A": ("log", 220.0, 5000.0),
    "Bx": ("asinh", -1500.0, 1500.0),
    "By": ("asinh", -1500.0, 1500.0),
    "Bz": ("asinh", -1500.0, 1500.0),
}


# --------------------------------------------------------------------------------------------
# per-channel parameter helpers


def _as_float32(x: np.ndarray) -> np.ndarray:
    """Any array -> float32 view or copy (no copy when already float32)."""
    return np.asarray(x, dtype=np.float32)


def _per_channel(value: PerChannel, n: int, name: str) -> np.ndarray:
    """Scalar or (C,) -> (C,) float32; raises ValueError on a length mismatch."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=np.float32)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {arr.shape}")
    return arr


def _per_channel_optional(value: OptionalPerChannel, n: int, name: str) -> list[float | None]:
    """None, scalar or (C,) sequence possibly holding None -> list of C floats or None."""
    if value is None or np.ndim(value) == 0:
        return [None if value is None else float(value)] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} must be a scalar or have length {n}, got {len(values)}")
    return [None if v is None else float(v) for v in values]


def _methods(methods: Methods, n: int) -> tuple[str, ...]:
    """str or (C,) sequence of str -> validated tuple of C method names."""
    out = (methods,) * n if isinstance(methods, str) else tuple(methods)
    if len(out) != n:
        raise ValueError(f"methods must be a str or have length {n}, got {len(out)}")
    for c, m in enumerate(out):
        if m not in SCALING_METHODS:
            raise ValueError(
                f"channel {c}: unknown scaling method {m!r}, expected one of {SCALING_METHODS}"
            )
    return out


def _channel_view(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> (C, 1, ..., 1) so it broadcasts over an array with `ndim` dimensions."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


def _check_channels(x: np.ndarray, n: int, name: str) -> None:
    if x.shape[0] != n:
        raise ValueError(f"{name} has {n} channels but x has shape {x.shape} (channel axis 0)")


# --------------------------------------------------------------------------------------------
# physical units


def exposure_normalise(x: np.ndarray, exptime: PerChannel) -> np.ndarray:
    """Counts to count rate: x / max(exptime, 0.01).

    x: (C, H, W) or (C, T, H, W), DN -> same shape float32, DN/s.
    exptime: scalar or (C,) seconds.
    """
    x = _as_float32(x)
    t = np.maximum(_per_channel(exptime, x.shape[0], "exptime"), np.float32(MIN_EXPTIME))
    return x / _channel_view(t, x.ndim)


# --------------------------------------------------------------------------------------------
# per-channel scaling


def scaling_params(
    channels: Sequence[str],
) -> tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Look channel names up in DEFAULT_SCALING.

    channels: (C,) names such as "171A" or "Bz" -> (methods, clip_min, clip_max, softening),
    each (C,): the arguments of :func:`scale`. Softening is MAGNETOGRAM_SOFTENING_G for
    magnetograms, 1 otherwise.
    """
    for ch in channels:
        if ch not in DEFAULT_SCALING:
            raise KeyError(f"unknown channel {ch!r}; known channels: {sorted(DEFAULT_SCALING)}")
    params = [DEFAULT_SCALING[ch] for ch in channels]
    return (
        tuple(p[0] for p in params),
        tuple(p[1] for p in params),
        tuple(p[2] for p in params),
        tuple(MAGNETOGRAM_SOFTENING_G if ch in MAGNETOGRAM_CHANNELS else 1.0 for ch in channels),
    )


def cast_into(dst: np.ndarray, src) -> np.ndarray:
    """``dst[...] = src`` (an array, or a torch tensor such as a bfloat16 view) with torch's
    vectorised cast on one thread; returns ``dst``. numpy's float32 -> float16 cast has no
    vector path (~60 ns a value here, 80x torch's; a reader of float16 images spent more
    time casting than decoding) and its float16 -> float32 ran at a fifth of torch's speed;
    both round to nearest even, bit for bit alike. One thread: readers are the
    parallelism, and an OpenMP pool inherited through a fork would hang in a parallel copy."""
    import torch

    s = src if isinstance(src, torch.Tensor) else torch.from_numpy(src)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.from_numpy(dst).copy_(s)
    finally:
        torch.set_num_threads(threads)
    return dst


WIRE_MAX = 2.0**15
"""Largest magnitude of a float16 image in physical units after its scale (float16 reaches 65504)."""


def wire_exponents(
    channels: Sequence[str],
    clip_min: Sequence[float | None],
    clip_max: Sequence[float | None],
) -> tuple[int, ...]:
    """Per channel ``k``: physical values clipped to the channel's bounds, times ``2**-k``,
    lie within +-``WIRE_MAX``, so that float16 holds them with 11 significant bits (a
    power of two scales exactly: only float16's own rounding is added).

    How float16 images in physical units travel (``transform.on: device`` with
    ``transform.dtype: float16``): the readers clip (the transform clips to the same
    bounds anyway) and scale, the device multiplies by ``2**k`` in float32."""
    out = []
    for c, lo, hi in zip(channels, clip_min, clip_max, strict=True):
        if lo is None or hi is None:
            raise ValueError(
                f"transform.dtype=float16 with transform.on=device sends physical units "
                f"clipped to each channel's bounds: channel {c} has [{lo}, {hi}]; give it "
                "both bounds in transform.scaling, or use transform.dtype=float32"
            )
        top = max(abs(float(lo)), abs(float(hi)), 1e-30)
        out.append(math.ceil(math.log2(top / WIRE_MAX)))
    return tuple(out)


def scaled_clip(
    method: str, clip_min: float | None, clip_max: float | None, softening: float = 1.0
) -> float:
    """The largest magnitude a channel's scaled values can reach: its clip bound, scaled.

    A fixed physical scale to divide by (magnetograms: the same for every period, unlike
    statistics of the train split)."""
    if clip_min is None or clip_max is None:
        raise ValueError(f"a fixed scale needs both clip bounds, got [{clip_min}, {clip_max}]")
    bounds = np.array([[clip_min, clip_max]], np.float32)
    plan = _scaling_plan(1, method, clip_min, clip_max, softening)
    _scale_(bounds, plan)
    return float(np.abs(bounds).max())


def _scaling_plan(
    n: int,
    methods: Methods,
    clip_min: OptionalPerChannel,
    clip_max: OptionalPerChannel,
    softening: PerChannel | None,
) -> list[tuple[str, float | None, float | None, float]]:
    """Validate scaling parameters -> per channel (method, lo, hi, softening)."""
    ms = _methods(methods, n)
    los = _per_channel_optional(clip_min, n, "clip_min")
    his = _per_channel_optional(clip_max, n, "clip_max")
    soft = _per_channel(1.0 if softening is None else softening, n, "softening")
    plan = []
    for c, (m, lo, hi, s) in enumerate(zip(ms, los, his, soft, strict=True)):
        if m == "log" and (lo is None or lo <= 0):
            raise ValueError(f"channel {c}: log scaling needs clip_min > 0, got {lo}")
        if m == "sqrt":
            lo = 0.0 if lo is None else max(lo, 0.0)
        if m == "asinh" and not s > 0:
            raise ValueError(f"channel {c}: asinh softening must be > 0, got {s}")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"channel {c}: clip_min {lo} > clip_max {hi}")
        plan.append((m, lo, hi, float(s)))
    return plan


def _clip_(a: np.ndarray, lo: float | None, hi: float | None) -> None:
    """In-place clip; either bound may be None."""
    if lo is not None or hi is not None:
        np.clip(a, lo, hi, out=a)


def _scale_(x: np.ndarray, plan: list[tuple[str, float | None, float | None, float]]) -> None:
    """In-place forward scaling of a float32 (C, ...) array."""
    for c, (m, lo, hi, s) in enumerate(plan):
        xc = x[c]
        _clip_(xc, lo, hi)
        if m == "log":
            np.log10(xc, out=xc)
        elif m == "sqrt":
            np.sqrt(xc, out=xc)
        elif m == "asinh":
            xc /= np.float32(s)
            np.arcsinh(xc, out=xc)


def scale(
    x: np.ndarray,
    methods: Methods,
    clip_min: OptionalPerChannel = None,
    clip_max: OptionalPerChannel = None,
    softening: PerChannel | None = None,
) -> np.ndarray:
    """Per-channel clip then compress the dynamic range.

    x: (C, H, W) or (C, T, H, W) float32, physical units -> same shape float32.
    methods: one of "linear", "log", "sqrt", "asinh" for all channels, or (C,) of them.
    clip_min, clip_max: scalar or (C,); None (overall or per entry) means no bound.
      linear: clip(x);  log: log10(clip(x)), needs clip_min > 0;
      sqrt: sqrt(clip(x, max(clip_min, 0), clip_max));  asinh: arcsinh(clip(x) / softening).
    softening: scalar or (C,) > 0, used by asinh only; default 1.0.
    """
    plan = _scaling_plan(x.shape[0], methods, clip_min, clip_max, softening)
    y = np.array(x, dtype=np.float32)
    _scale_(y, plan)
    return y


# --------------------------------------------------------------------------------------------
# z-score


def _zscore_params(mean: PerChannel, std: PerChannel, n: int) -> tuple[np.ndarray, np.ndarray]:
    m = _per_channel(mean, n, "mean")
    s = np.maximum(_per_channel(std, n, "std"), np.float32(STD_FLOOR))
    return m, s


def zscore(x: np.ndarray, mean: PerChannel, std: PerChannel) -> np.ndarray:
    """(x - mean) / max(std, 1e-6) per channel; the floor keeps constant channels finite.

    x: (C, H, W) or (C, T, H, W) float32 -> same shape float32.
    mean, std: scalar or (C,), broadcast over the remaining axes.
    """
    x = _as_float32(x)
    m, s = _zscore_params(mean, std, x.shape[0])
    return (x - _channel_view(m, x.ndim)) / _channel_view(s, x.ndim)


# --------------------------------------------------------------------------------------------
# limb


def disk_mask(
    size: int | tuple[int, int],
    radius_px: float,
    center: tuple[float, float] | None = None,
) -> np.ndarray:
    """Boolean disk: True where (row - cy)^2 + (col - cx)^2 <= radius_px^2.

    size: H (square) or (H, W) -> (H, W) bool.
    center: (cy, cx) in pixels; defaults to the image centre ((H - 1) / 2, (W - 1) / 2).
    """
    h, w = (size, size) if isinstance(size, int) else size
    cy, cx = ((h - 1) / 2, (w - 1) / 2) if center is None else center
    rows, cols = np.ogrid[:h, :w]
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius_px**2


def _check_limb_mode(mode: str) -> None:
    if mode not in LIMB_MODES:
        raise ValueError(f"unknown limb mode {mode!r}, expected one of {LIMB_MODES}")


def _apply_limb_(
    x: np.ndarray,
    mode: str,
    is_magnetogram: Sequence[bool],
    radius_px: float | None,
    fill: float,
) -> None:
    """In-place version of `apply_limb`."""
    h, w = x.shape[-2:]
    radius = disk_radius_px(min(h, w)) if radius_px is None else radius_px
    off_disk = ~disk_mask((h, w), radius)
    if mode == "mask_off_disk":
        np.copyto(x, np.float32(fill), where=off_disk)
        return
    # keep_corona: HMI has no data off the disk, so magnetograms are always zero there.
    for c, is_mag in enumerate(is_magnetogram):
        if is_mag:
            np.copyto(x[c], np.float32(0), where=off_disk)


def apply_limb(
    x: np.ndarray,
    mode: Literal["keep_corona", "mask_off_disk"],
    is_magnetogram: Sequence[bool],
    radius_px: float | None = None,
    fill: float = 0.0,
) -> np.ndarray:
    """Handle pixels beyond the solar limb.

    x: (C, H, W) or (C, T, H, W) float32 -> same shape float32.
    mode: "keep_corona": EUV channels untouched, magnetogram channels zero off the disk;
          "mask_off_disk": every channel set to `fill` off the disk.
    is_magnetogram: (C,) bool.
    radius_px: disk radius; defaults to `disk_radius_px(H)`, centred on the image.
    """
    _check_limb_mode(mode)
    _check_channels(x, len(is_magnetogram), "is_magnetogram")
    y = np.array(x, dtype=np.float32)
    _apply_limb_(y, mode, is_magnetogram, radius_px, fill)
    return y


# --------------------------------------------------------------------------------------------
# resolution


def downsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Area-average `factor` x `factor` blocks over the last two axes.

    x: (..., H, W) with H and W divisible by factor -> (..., H / factor, W / factor) float32.
    """
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(
            f"cannot downsample shape {x.shape} by factor {factor}: H, W not divisible"
        )
    x = _as_float32(x)
    if factor == 1:
        return x.copy()
    blocks = x.reshape(*x.shape[:-2], h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(-3, -1), dtype=np.float32)


def downsample_to(x: np.ndarray, size: int) -> np.ndarray:
    """Area-average a square image down to `size` x `size`.

    x: (..., H, W) with H == W == k * size for an integer k -> (..., size, size) float32.
    """
    h, w = x.shape[-2:]
    if size < 1 or h != w or h % size:
        raise ValueError(f"cannot downsample shape {x.shape} to {size} x {size}")
    return downsample(x, h // size)


# --------------------------------------------------------------------------------------------
# synthetic dimming (autocalibration)


def dim(x: np.ndarray, alpha: PerChannel) -> np.ndarray:
    """Multiply channel c by alpha[c]; apply in physical units, before scaling.

    x: (C, H, W) or (C, T, H, W) float32 -> same shape float32.
    alpha: scalar or (C,), each in (0, 1].
    """
    x = _as_float32(x)
    a = _per_channel(alpha, x.shape[0], "alpha")
    if not np.all((a > 0) & (a <= 1)):
        raise ValueError(f"dimming factors must lie in (0, 1], got {a}")
    return x * _channel_view(a, x.ndim)


def sample_dimming_factors(
    rng: np.random.Generator, n_channels: int, alpha_min: float = 0.01
) -> np.ndarray:
    """Draw per-channel dimming factors uniformly from [alpha_min, 1].

    -> (n_channels,) float32.
    """
    if not 0 < alpha_min <= 1:
        raise ValueError(f"alpha_min must lie in (0, 1], got {alpha_min}")
    return rng.uniform(alpha_min, 1.0, size=n_channels).astype(np.float32)


# --------------------------------------------------------------------------------------------
# composed pipeline


@dataclass(frozen=True)
class Preprocessor:
    """Physical-unit cube -> model input: downsample, limb, scale, z-score, cast.

    mean/std are statistics of the *scaled* values (z-score runs after scaling); None skips
    the z-score. radius_px is the disk radius at the output resolution (None: SDOML default
    for the array being processed). out_size None keeps the input resolution.
    """

    channels: tuple[str, ...]
    methods: tuple[str, ...]
    clip_min: tuple[float | None, ...]
    clip_max: tuple[float | None, ...]
    is_magnetogram: tuple[bool, ...]
    softening: tuple[float, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    limb: Literal["keep_corona", "mask_off_disk"] = "keep_corona"
    radius_px: float | None = None
    out_size: int | None = None
    dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        n = len(self.channels)
        # Fail at construction, not on the first sample.
        _scaling_plan(n, self.methods, self.clip_min, self.clip_max, self.softening)
        _check_limb_mode(self.limb)
        if len(self.is_magnetogram) != n:
            raise ValueError(f"is_magnetogram must have length {n}, got {len(self.is_magnetogram)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must both be given or both be None")
        if self.mean is not None:
            _zscore_params(self.mean, self.std, n)
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")

    def channel(self, i: int) -> Preprocessor:
        """The same chain for channel ``i`` alone (float32 out), to transform channel by channel."""
        pick = lambda v: None if v is None else (v[i],)  # noqa: E731
        return replace(
            self,
            channels=(self.channels[i],),
            methods=(self.methods[i],),
            clip_min=(self.clip_min[i],),
            clip_max=(self.clip_max[i],),
            is_magnetogram=(self.is_magnetogram[i],),
            softening=pick(self.softening),
            mean=pick(self.mean),
            std=pick(self.std),
            dtype="float32",
        )

    def _plan(self, n: int) -> list[tuple[str, float | None, float | None, float]]:
        return _scaling_plan(n, self.methods, self.clip_min, self.clip_max, self.softening)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (C, H, W) or (C, T, H, W) physical units -> (C, [T,] S, S) in self.dtype."""
        _check_channels(x, len(self.channels), "Preprocessor")
        if self.out_size is not None and self.out_size != x.shape[-1]:
            y = downsample_to(x, self.out_size)  # fresh array
        else:
            y = np.array(x, dtype=np.float32)  # the one working copy
        y = self.apply_(y)
        return y if self.dtype == "float32" else cast_into(np.empty(y.shape, self.dtype), y)

    def apply_(self, y: np.ndarray) -> np.ndarray:
        """Limb, scale and z-score ``y: (C, ..., S, S) float32`` in place (no downsampling,
        no cast); returns ``y``. For callers that own a fresh array: saves a copy."""
        n = len(self.channels)
        _check_channels(y, n, "Preprocessor")
        if y.dtype != np.float32:
            raise TypeError(f"apply_ works in place on float32, got {y.dtype}")
        _apply_limb_(y, self.limb, self.is_magnetogram, self.radius_px, 0.0)
        _scale_(y, self._plan(n))
        if self.mean is not None:
            m, s = _zscore_params(self.mean, self.std, n)
            y -= _channel_view(m, y.ndim)
            y /= _channel_view(s, y.ndim)
        return y

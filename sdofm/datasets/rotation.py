"""Solar differential rotation on SDOML frames: the rate at each latitude and a frame
rotated forward in time (the forecasting baseline a model must beat besides persistence).

Geometry as in SDOML v2 and the synthetic Sun (:mod:`sdofm.archive.synthetic.sun`):
pixel ``(row, col)`` lies at ``x = (col - c) / R`` (west) and ``y = (row - c) / R`` (north)
solar radii, ``c = (size - 1) / 2``, ``R`` the disk radius; with the observer's latitude
``b0`` (B0 angle, 0 for the synthetic Sun) a point of heliographic latitude ``lat`` and
longitude ``lon`` from the central meridian is seen at
``x = cos(lat) sin(lon)``, ``y = cos(b0) sin(lat) - sin(b0) cos(lat) cos(lon)``.
"""

from __future__ import annotations

import numpy as np

# Snodgrass & Ulrich (1990), magnetic features, sidereal, deg/day; the synodic rate, as seen
# from Earth (and SDO), is slower by Earth's orbital motion.
SNODGRASS_DEG_PER_DAY = (14.713, -2.396, -1.787)
EARTH_ORBIT_DEG_PER_DAY = 0.9856


def synodic_rate(lat_deg: np.ndarray | float) -> np.ndarray:
    """Synodic rotation rate (deg/day) at heliographic latitude ``lat_deg``:
    ``A + B sin^2(lat) + C sin^4(lat)`` minus Earth's orbital rate."""
    a, b, c = SNODGRASS_DEG_PER_DAY
    s2 = np.sin(np.radians(lat_deg)) ** 2
    return a + b * s2 + c * s2 * s2 - EARTH_ORBIT_DEG_PER_DAY


def rotate_frames(
    frames: np.ndarray, hours: float, radius_px: float, b0_deg: float = 0.0
) -> np.ndarray:
    """``frames (..., H, W)`` as they would look ``hours`` later if the disk only rotated
    differentially: each on-disk pixel takes the value, bilinearly interpolated, of the
    point that rotates into it. Pixels whose source lies behind the limb (rotating into
    view) and pixels off the disk keep their own value (persistence).
    """
    *lead, h, w = frames.shape
    c_row, c_col = (h - 1) / 2, (w - 1) / 2
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = (cols - c_col) / radius_px, (rows - c_row) / radius_px
    on = x * x + y * y < 1.0
    z = np.sqrt(np.clip(1.0 - x * x - y * y, 0.0, None))  # towards the observer
    b0 = np.radians(b0_deg)
    # Observer frame -> heliographic: undo the B0 tilt about the x axis.
    yh = np.cos(b0) * y + np.sin(b0) * z
    zh = -np.sin(b0) * y + np.cos(b0) * z
    lat = np.arcsin(np.clip(yh, -1.0, 1.0))
    lon = np.arctan2(x, zh)
    src_lon = lon - np.radians(synodic_rate(np.degrees(lat)) * hours / 24.0)
    # The source point, back in the observer's frame.
    xs = np.cos(lat) * np.sin(src_lon)
    zhs = np.cos(lat) * np.cos(src_lon)
    ys = np.cos(b0) * yh - np.sin(b0) * zhs
    zs = np.sin(b0) * yh + np.cos(b0) * zhs
    use = on & (zs > 0)
    src_col = xs * radius_px + c_col
    src_row = ys * radius_px + c_row
    out = np.array(frames, copy=True)
    r0 = np.floor(src_row[use]).astype(np.int64)
    k0 = np.floor(src_col[use]).astype(np.int64)
    fr, fk = src_row[use] - r0, src_col[use] - k0
    r0, k0 = np.clip(r0, 0, h - 2), np.clip(k0, 0, w - 2)
    flat = frames.reshape(-1, h, w)
    dst = out.reshape(-1, h, w)
    for i in range(flat.shape[0]):
        f = flat[i]
        v = (
            f[r0, k0] * (1 - fr) * (1 - fk)
            + f[r0 + 1, k0] * fr * (1 - fk)
            + f[r0, k0 + 1] * (1 - fr) * fk
            + f[r0 + 1, k0 + 1] * fr * fk
        )
        dst[i][use] = v
    return out.reshape(*lead, h, w)

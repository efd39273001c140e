"""How much of dimming and virtual EVE a few disk-integrated numbers explain: the
two science tasks solved without images, on an archive's train and test splits.

* dimming: each AIA channel's factor read off its median disk brightness, against that
  channel's mean median over the training frames (no learning: alpha_hat = alpha x
  10^(median_t - mean_train)); alpha ~ U[alpha_min, 1] as the task draws it.
* dimming, anchored on HMI: each AIA channel's median disk brightness predicted by least
  squares from HMI's undimmed magnetograms (log median and log total unsigned field on
  the disk, both network and regions), fitted on the training frames; the factor is read
  off the observed median against that prediction (alpha_hat = alpha x 10^residual).
* virtual EVE: least squares from the 9 channels' log total brightness to each line's
  log irradiance, fitted on the training frames; relative error per line on the scored
  frames; beside it the training mean of each line (climatology).

    .venv/bin/python bench/brightness_rules.py                                   # the benchmark archive
    .venv/bin/python bench/brightness_rules.py configs/data/benchmark.yaml --split val

Reads the zarr arrays of every year directly and labels frames with the config's own split
(``data.split``, without its buffer); prints one JSON line. A trained head that scores
worse than these rules reads less from the image than a few disk totals hold.
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import zarr

from sdofm.config import load_config
from sdofm.constants import AIA_CHANNELS, disk_radius_px
from sdofm.datasets.index import assign_splits
from sdofm.datasets.index import nearest as index_nearest
from sdofm.datasets.sdoml.times import parse_times
from sdofm.datasets.transforms import disk_mask


def nearest(stored: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (position in ``stored`` of the frame nearest each of ``times``, its distance);
    the index's own matching, on ``stored`` in time order (SDOML v2 arrays are not)."""
    order = np.argsort(stored, kind="stable")
    ns = stored[order].astype("datetime64[ns]").astype(np.int64)
    pos, _ = index_nearest(ns, times.astype("datetime64[ns]").astype(np.int64), 0)
    return order[pos], np.abs(stored[order][pos] - times)


def channel_frames(store, channel: str) -> tuple[np.ndarray, np.ndarray]:
    """Every year's frames of one channel -> ((n,) T_OBS as datetime64[ms], (n, H, W))."""
    times, frames = [], []
    for year in sorted(store.group_keys()):
        if channel in store[year]:
            a = store[year][channel]
            times.append(parse_times(a.attrs["T_OBS"])[0].astype("datetime64[ms]"))
            frames.append(a[:])
    return np.concatenate(times), np.concatenate(frames)


def labels(times: np.ndarray, split) -> np.ndarray:
    return assign_splits(times.astype("datetime64[ns]").astype(np.int64), split)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/data/benchmark.yaml")
    p.add_argument("--split", default="test", choices=["test", "val"], help="the scored split")
    p.add_argument("--every", type=int, default=10, help="the EVE fit: every n-th time")
    p.add_argument("--alpha-min", type=float, default=0.01)
    a = p.parse_args()
    warnings.filterwarnings("ignore", message="no explicit representation of timezones")
    cfg = load_config(a.config)
    root, split = cfg.data.root, cfg.data.split

    aia = zarr.open_group(f"{root}/sdomlv2.zarr", mode="r")
    hmi_times, bz = channel_frames(zarr.open_group(f"{root}/sdomlv2_hmi.zarr", mode="r"), "Bz")
    hmi_disk = disk_mask(bz.shape[-1], 0.9 * disk_radius_px(bz.shape[-1]))
    absb = np.abs(bz[:, hmi_disk])
    hmi_features = np.stack(
        [np.log10(np.median(absb, 1)), np.log10(absb.sum(1)), np.ones(len(bz))], 1
    )
    del bz, absb
    channels = [c for c in AIA_CHANNELS if c in cfg.data.aia_channels]
    dim_mae, dev_sd, totals, times = [], [], None, None
    hmi_mae, hmi_sd = [], []
    for k, c in enumerate(channels):
        own, x = channel_frames(aia, c)  # one channel at a time
        if times is None:  # the EVE fit's times: the first channel's, thinned
            times = np.sort(own)[:: a.every]
            totals = np.full((len(times), len(channels)), np.nan)
        disk = disk_mask(x.shape[-1], 0.9 * disk_radius_px(x.shape[-1]))
        med = np.log10(np.median(x[:, disk], axis=1))
        lab = labels(own, split)
        dev = med[lab == a.split] - med[lab == "train"].mean()
        # E|alpha_hat - alpha| = E[alpha] E|10^dev - 1| (alpha independent of the Sun)
        dim_mae.append((1 + a.alpha_min) / 2 * np.abs(10**dev - 1).mean())
        dev_sd.append(dev.std())
        at, gap = nearest(hmi_times, own)  # each AIA frame's magnetogram
        near = gap <= np.timedelta64(180, "s")
        X = hmi_features[at]
        fit, scored = (lab == "train") & near, (lab == a.split) & near
        w, *_ = np.linalg.lstsq(X[fit], med[fit], rcond=None)
        dev = med[scored] - X[scored] @ w
        hmi_mae.append((1 + a.alpha_min) / 2 * np.abs(10**dev - 1).mean())
        hmi_sd.append(dev.std())
        at, gap = nearest(own, times)
        near = gap <= np.timedelta64(180, "s")
        totals[near, k] = np.log10(x[at[near]].sum(axis=(1, 2)))
    dim_mae, hmi_mae = np.array(dim_mae), np.array(hmi_mae)

    eve = zarr.open_group(f"{root}/sdomlv2_eve.zarr/MEGS-A", mode="r")
    eve_times = np.array(eve["Time"][:], dtype="datetime64[ms]")
    at, gap = nearest(eve_times, times)
    lines = [k for k in eve if k not in ("Time", "Fe XVI_2")]  # the task's default 38
    y = np.stack([np.asarray(eve[k][:])[at] for k in lines], 1)
    ok = (
        (gap <= np.timedelta64(60, "s"))
        & np.all(np.isfinite(y) & (y > 0), 1)
        & np.all(np.isfinite(totals), 1)
    )
    lab = labels(times, split)
    fit, scored = (lab == "train") & ok, (lab == a.split) & ok
    X = np.concatenate([totals, np.ones((len(totals), 1))], 1)
    w, *_ = np.linalg.lstsq(X[fit], np.log10(y[fit]), rcond=None)
    rel = (np.abs(10 ** (X[scored] @ w) - y[scored]) / y[scored]).mean(0)
    constant = (np.abs(y[fit].mean(0) - y[scored]) / y[scored]).mean(0)

    for c, v, sd, hv, hsd in zip(channels, dim_mae, dev_sd, hmi_mae, hmi_sd, strict=True):
        print(
            f"dimming {c:>6}: median disk brightness sd {sd:.4f} dex -> alpha MAE {v:.4f}; "
            f"residual from HMI sd {hsd:.4f} dex -> alpha MAE {hv:.4f}"
        )
    print(
        f"dimming, no learning: alpha MAE {dim_mae.mean():.4f} (mean over {len(channels)} channels)"
    )
    print(f"dimming, anchored on HMI (least squares): alpha MAE {hmi_mae.mean():.4f}")
    print(
        f"virtual EVE, least squares on {len(channels)} log channel totals: rel. error "
        f"{rel.mean():.4f} (worst line {rel.max():.4f}); climatology: {constant.mean():.4f}"
    )
    record = {
        "bench": "brightness_rules",
        "config": a.config,
        "split": a.split,
        "eve_frames": int(scored.sum()),
        "dimming_mae": round(float(dim_mae.mean()), 4),
        "dimming_mae_hmi": round(float(hmi_mae.mean()), 4),
        "eve_rel_error": round(float(rel.mean()), 4),
        "eve_rel_error_climatology": round(float(constant.mean()), 4),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()

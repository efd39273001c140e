"""How much of dimming and virtual EVE one brightness number per channel explains: the
two science tasks solved without images, on an archive's train and test months.

* dimming: each AIA channel's factor read off its median disk brightness, against that
  channel's mean median over the training frames (no learning: alpha_hat = alpha x
  10^(median_t - mean_train)); alpha ~ U[alpha_min, 1] as the task draws it.
* virtual EVE: least squares from the 9 channels' log total brightness to each line's
  log irradiance, fitted on the training frames; relative error per line on the test frames.

    .venv/bin/python bench/brightness_rules.py                 # the benchmark archive
    .venv/bin/python bench/brightness_rules.py --root data/synthetic --train-months 10 --test-months 12

Reads the zarr arrays directly (every ``--every``-th frame; months stand in for the split,
without its buffer) and prints one JSON line. A learned head that scores worse than
these rules reads less from the image than one number per channel holds.
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import zarr

from sdofm.constants import AIA_CHANNELS, disk_radius_px


def months(times: np.ndarray) -> np.ndarray:
    return times.astype("datetime64[M]").astype(int) % 12 + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/benchmark")
    p.add_argument("--year", default="2011")
    p.add_argument("--train-months", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--test-months", type=int, nargs="+", default=[5, 7, 9])
    p.add_argument("--every", type=int, default=10, help="use every n-th frame")
    p.add_argument("--alpha-min", type=float, default=0.01)
    a = p.parse_args()
    warnings.filterwarnings("ignore", message="no explicit representation of timezones")

    aia = zarr.open_group(f"{a.root}/sdomlv2.zarr/{a.year}", mode="r")
    channels = [c for c in AIA_CHANNELS if c in aia]
    times = np.array(aia[channels[0]].attrs["T_OBS"], dtype="datetime64[ms]")
    rows = np.arange(len(times))[:: a.every]
    m = months(times[rows])
    train, test = np.isin(m, a.train_months), np.isin(m, a.test_months)
    size = aia[channels[0]].shape[-1]
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disk = np.hypot(yy, xx) < 0.9 * disk_radius_px(size)

    medians, totals = [], []
    for c in channels:
        x = aia[c].get_orthogonal_selection((rows, slice(None), slice(None)))
        medians.append(np.log10(np.median(x[:, disk], axis=1)))
        totals.append(np.log10(x.sum(axis=(1, 2))))
    medians, totals = np.stack(medians, 1), np.stack(totals, 1)

    # dimming: E|alpha_hat - alpha| = E[alpha] E|10^dev - 1| (alpha independent of the Sun)
    dev = medians[test] - medians[train].mean(0)
    mean_alpha = (1 + a.alpha_min) / 2
    dim_mae = mean_alpha * np.abs(10**dev - 1).mean(0)

    eve = zarr.open_group(f"{a.root}/sdomlv2_eve.zarr/MEGS-A", mode="r")
    eve_times = np.array(eve["Time"][:], dtype="datetime64[ms]")
    at = np.clip(np.searchsorted(eve_times, times[rows]), 0, len(eve_times) - 1)
    lines = [k for k in eve if k not in ("Time", "Fe XVI_2")]  # the task's default 38
    y = np.stack([np.asarray(eve[k][:])[at] for k in lines], 1)
    ok = (np.abs(eve_times[at] - times[rows]) <= np.timedelta64(60, "s")) & np.all(
        np.isfinite(y) & (y > 0), 1
    )
    X = np.concatenate([totals, np.ones((len(totals), 1))], 1)
    fit, te = train & ok, test & ok
    w, *_ = np.linalg.lstsq(X[fit], np.log10(y[fit]), rcond=None)
    rel = (np.abs(10 ** (X[te] @ w) - y[te]) / y[te]).mean(0)
    constant = (np.abs(y[fit].mean(0) - y[te]) / y[te]).mean(0)

    for c, v in zip(channels, dim_mae, strict=True):
        print(
            f"dimming {c:>6}: median disk brightness sd {dev[:, channels.index(c)].std():.4f}"
            f" dex on test frames -> alpha MAE {v:.4f}"
        )
    print(
        f"dimming, no learning: alpha MAE {dim_mae.mean():.4f} (mean over {len(channels)} channels)"
    )
    print(
        f"virtual EVE, least squares on 9 log channel totals: rel. error {rel.mean():.4f} "
        f"(worst line {rel.max():.4f}); the training mean: {constant.mean():.4f}"
    )
    print(
        json.dumps(
            {
                "bench": "brightness_rules",
                "root": a.root,
                "test_frames": int(test.sum()),
                "dimming_mae": round(float(dim_mae.mean()), 4),
                "eve_rel_error": round(float(rel.mean()), 4),
                "eve_rel_error_constant": round(float(constant.mean()), 4),
            }
        )
    )


if __name__ == "__main__":
    main()

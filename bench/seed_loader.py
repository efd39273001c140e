"""Contender (b) of ``bench/loader.py``: SDO-FM's original per-sample loader, run as a child
process so that it can run on the seed's own stack (zarr 2.x, as SDO-FM pinned) from an
isolated environment. Imports nothing from sdofm.

    python bench/seed_loader.py SAMPLES.npz --cpus N --epochs E --warmup W --repeat P

``SAMPLES.npz`` holds ``channels``, ``urls`` (one per channel) and per channel
``{c}_year`` / ``{c}_idx`` (one row per sample). A timed pass is ``E`` epochs (a warm-up
pass one). Prints one JSON line: the fastest pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset


class SeedDataset(Dataset):
    """SDO-FM's original loader: one row lookup and one zarr read per channel per sample."""

    def __init__(self, years: dict, idxs: dict, channels: list[str], urls: dict[str, str]):
        self.years, self.idxs, self.channels, self.urls = years, idxs, channels, urls
        self.arrays: dict[tuple[str, str], object] | None = None  # opened once per worker

    def __len__(self) -> int:
        return len(self.years[self.channels[0]])

    def _open(self) -> dict[tuple[str, str], object]:
        groups = {url: zarr.open_group(url, mode="r") for url in set(self.urls.values())}
        return {
            (str(y), c): groups[self.urls[c]][f"{y}/{c}"]
            for c in self.channels
            for y in np.unique(self.years[c])
        }

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        if self.arrays is None:  # first item in this worker process
            self.arrays = self._open()
        frames = [
            self.arrays[(str(self.years[c][i]), c)][int(self.idxs[c][i])] for c in self.channels
        ]
        return i, torch.from_numpy(np.stack(frames).astype(np.float32, copy=False))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("samples")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    z = np.load(args.samples)
    channels = [str(c) for c in z["channels"]]
    urls = dict(zip(channels, (str(u) for u in z["urls"]), strict=True))
    ds = SeedDataset(
        {c: z[f"{c}_year"] for c in channels}, {c: z[f"{c}_idx"] for c in channels}, channels, urls
    )
    loader = DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.cpus,
        multiprocessing_context="fork",  # the cheapest start for the seed's workers
        generator=torch.Generator().manual_seed(0),
    )

    def cpu() -> float:  # this process and its reaped DataLoader workers
        s, c = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def run_pass(epochs: int) -> tuple[float, float]:
        # Worker start-up included in every epoch (as in the seed's training loop).
        c0, t0 = cpu(), time.perf_counter()
        for _ in range(epochs):
            seen = [ids.numpy() for ids, _ in loader]
            ids = np.sort(np.concatenate(seen))
            assert np.array_equal(ids, np.arange(len(ds))), "seed: wrong sample ids"
        return time.perf_counter() - t0, cpu() - c0

    for _ in range(args.warmup):
        run_pass(1)
    seconds, cpu_s = min(run_pass(args.epochs) for _ in range(max(args.repeat, 1)))
    stack = f"zarr {zarr.__version__} ({zarr.__file__}), torch {torch.__version__}"
    n = len(ds) * args.epochs
    print(json.dumps({"samples": n, "seconds": seconds, "cpu": cpu_s, "stack": stack}))


if __name__ == "__main__":
    main()

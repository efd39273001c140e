"""Append AIA or HMI level-1 FITS files to an SDOML v2 store, as a Ray job.

    ray job submit --working-dir . -- python ray_jobs/ingest.py fits/ data/real --instrument aia

The same package call as ``sdofm data ingest``; re-running it adds nothing twice.
"""

import argparse

from sdofm.archive.ingest import ingest
from sdofm.runtime import init_ray

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("source", help="a folder of FITS files (recursive) or a glob")
parser.add_argument("out", help="the data root, or a store path ending in .zarr")
parser.add_argument("--instrument", required=True, choices=["aia", "hmi"])
parser.add_argument("--size", type=int, help="frame size (default: the store's, else 512)")
parser.add_argument("--channel", help="HMI component the files hold; AIA: the one channel kept")
parser.add_argument("--deg-cor", nargs="*", default=[], help="AIA CHANNEL=FACTOR ...")
args = parser.parse_args()

init_ray()
deg_cor = {k: float(v) for k, _, v in (item.partition("=") for item in args.deg_cor)}
report = ingest(**{**vars(args), "deg_cor": deg_cor})  # the options are ingest's arguments
for path, reason in report.skipped:
    print(f"skipped {path}: {reason}")
print(
    f"{report.store}: +{report.n_ingested} frames {report.ingested}, {len(report.already)} already "
    f"there, {len(report.skipped)} skipped ({report.frames_per_s:.1f} frames/s)"
)

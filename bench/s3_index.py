"""What building the alignment index of one year of the archive costs over S3, and what a reader holds.

Run from the repository root (the moto S3 server comes with the dev extra)::

    .venv/bin/python bench/s3_index.py [--root DIR] [--year Y] [--aia 94A,...] [--hmi Bx,...]

One year of the archive-scale replica (``sdofm data replica``: every 6 min for AIA,
12 min for HMI, the full level-1 keyword set per frame) is written under ``--root``
(default ``/tmp/sdofm-replica``; reused when there) and uploaded to moto's S3 server
on 127.0.0.1, behind a proxy that counts every request and byte. Then, each in its
own process as a user runs them:

1. ``sdofm data index`` of that year through ``s3://`` (first build): seconds, bytes,
   GETs of array headers (``.zattrs``), peak RSS;
2. the same command again (reuse of the up-to-date index): the same figures;
3. a reader process (``BlockReader``, as in a Ray Data read task) reading one block of
   8 samples of every selected channel: header GETs and peak RSS.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.s3 import MotoServer, Proxy, storage_options  # noqa: E402

BUCKET = "sdofm-replica"
ARRAY_HEADER = re.compile(r"/\d{4}/[^/]+/\.zattrs$")

# Each command runs under this wrapper, which writes its own peak RSS (VmHWM: this
# process's memory since exec, unlike a child's ru_maxrss, which starts from its parent's).
MEASURED = """
import atexit, os, runpy, sys
def _peak():
    kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    open(os.environ["SDOFM_BENCH_RSS"], "w").write(str(kb))
atexit.register(_peak)
sys.argv = sys.argv[1:]
if sys.argv[0] == "-c":
    code = sys.argv.pop(1)
    exec(compile(code, "<reader>", "exec"), {"__name__": "__main__"})
else:
    runpy.run_module(sys.argv[0], run_name="__main__")
"""

READER = """
import json, sys
from sdofm.config import load_config
from sdofm.datasets.blocks import BlockReader, plan_split
from sdofm.datasets.index import index_path, read_index
cfg = load_config(None, sys.argv[1:])
table, _ = read_index(index_path(cfg.data))
plan = plan_split(cfg.data, cfg.loader, table, "train")
reader = BlockReader(cfg.data, cfg.transform, cfg.loader, plan, None)
batch, bad = reader.read_block(0, epoch=0)
print(json.dumps({"samples": len(batch["image"]), "skipped": len(bad)}))
"""


def run(cmd: list[str], proxy: Proxy) -> dict:
    """Run ``cmd`` (a module and its arguments, or ``-c CODE ...``) in a fresh Python; its
    seconds, what went over the wire, its own peak RSS."""
    import tempfile

    proxy.reset()
    with tempfile.TemporaryFile("w+") as out, tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", MEASURED, *cmd],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "SDOFM_BENCH_RSS": rss.name},
        )
        seconds = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
        peak_kb = int(rss.read() or 0)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{text}")
    headers = Counter(r.key for r in proxy.gets(".zattrs") if ARRAY_HEADER.search(r.key))
    return {
        "seconds": round(seconds, 1),
        "requests": len(proxy.requests),
        "mb": round(proxy.bytes_out() / 1e6, 1),
        "header_gets": sum(headers.values()),
        "max_gets_per_header": max(headers.values(), default=0),
        "header_mb": round(
            sum(r.bytes_out for r in proxy.gets(".zattrs") if r.key in headers) / 1e6, 1
        ),
        "peak_rss_mb": round(peak_kb / 1024),
        "stdout": text.strip().splitlines()[-1] if text.strip() else "",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/sdofm-replica")
    p.add_argument("--year", type=int, default=2013)
    p.add_argument("--aia", default="94A,131A,171A,193A,211A,304A,335A,1600A,1700A")
    p.add_argument("--hmi", default="Bx,By,Bz")
    args = p.parse_args()
    aia = [c for c in args.aia.split(",") if c]
    hmi = [c for c in args.hmi.split(",") if c]

    from sdofm.archive.synthetic.replica import write_replica

    root = Path(args.root)
    t0 = time.perf_counter()
    wanted = [root / "sdomlv2.zarr" / str(args.year) / c / ".zattrs" for c in aia] + [
        root / "sdomlv2_hmi.zarr" / str(args.year) / c / ".zattrs" for c in hmi
    ]
    if not all(f.exists() for f in wanted):
        write_replica(str(root), years=[args.year], aia_channels=aia, hmi_channels=hmi)
    written_s = time.perf_counter() - t0
    header_bytes = {f"{f.parent.name}": f.stat().st_size for f in wanted}

    server = MotoServer(log=Path("/tmp/sdofm-bench-moto.log")).start()
    proxy = Proxy(server.url).start()
    try:
        server.create_bucket(BUCKET, public=True)
        t0 = time.perf_counter()
        for store, channels in (("sdomlv2.zarr", aia), ("sdomlv2_hmi.zarr", hmi)):
            for name in (".zgroup", ".zattrs"):
                if (root / store / name).exists():
                    server.client().put_object(
                        Bucket=BUCKET,
                        Key=f"replica/{store}/{name}",
                        Body=(root / store / name).read_bytes(),
                        ACL="public-read",
                    )
            for c in channels:
                sub = f"{store}/{args.year}"
                server.upload_tree(root / sub / c, BUCKET, f"replica/{sub}/{c}")
            for name in (".zgroup", ".zattrs"):
                f = root / store / str(args.year) / name
                if f.exists():
                    server.client().put_object(
                        Bucket=BUCKET,
                        Key=f"replica/{store}/{args.year}/{name}",
                        Body=f.read_bytes(),
                        ACL="public-read",
                    )
        upload_s = time.perf_counter() - t0

        cache = Path("/tmp/sdofm-bench-s3-cache")
        if cache.exists():
            for f in cache.glob("index-*.parquet"):
                f.unlink()
        overrides = [
            f"data.root=s3://{BUCKET}/replica",
            f"data.storage_options={json.dumps(storage_options(proxy.url, anon=True))}",
            f"data.aia_channels=[{','.join(aia)}]",
            f"data.hmi_channels=[{','.join(hmi)}]",
            f"data.start={args.year}-01-01",
            f"data.end={args.year}-12-31T23:59:59",
            f"data.cache_dir={cache}",
        ]
        env_py = ["sdofm.cli", "data", "index", *overrides]
        first = run(env_py, proxy)
        reuse = run(env_py, proxy)
        reader = run(
            [
                "-c",
                READER,
                *overrides,
                "loader.block_size=8",
                "transform.zscore=false",
            ],
            proxy,
        )
        reader.update(json.loads(reader.pop("stdout")))
    finally:
        proxy.stop()
        server.stop()
    print(
        json.dumps(
            {
                "year": args.year,
                "channels": aia + hmi,
                "header_mb": {k: round(v / 1e6, 1) for k, v in header_bytes.items()},
                "replica_written_s": round(written_s, 1),
                "upload_s": round(upload_s, 1),
                "index_first": first,
                "index_reuse": reuse,
                "reader": reader,
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()

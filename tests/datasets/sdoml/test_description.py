"""What ``sdofm data info`` reports."""

from __future__ import annotations

from sdofm.config import load_config
from sdofm.datasets.sdoml import Archive, describe


def test_describe_reports_counts_span_and_gaps(synth_root):
    cfg = load_config(None, [f"data.root={synth_root}"])
    s = describe(Archive.open(cfg.data, require=["aia", "hmi", "eve"]))
    rows = s["aia"]["years"]["2012"]
    assert set(rows) == {"94A", "131A", "171A", "193A", "211A", "304A", "335A", "1600A", "1700A"}
    assert len({r["frames"] for r in rows.values()}) > 1  # per-channel frame counts differ
    assert all(r["cadence_s"] == 360 and r["gaps"] > 0 for r in rows.values())
    assert rows["171A"]["codec"] == "blosc zstd 5 bit-shuffle" and rows["171A"]["chunks"] == [
        8,
        32,
        32,
    ]
    assert not rows["171A"]["in_time_order"]  # days are stored out of order
    assert s["hmi"]["years"]["2012"]["Bz"]["cadence_s"] == 720
    assert s["eve"]["lines"] == 39 and s["eve"]["first"].startswith("2012-06-29")

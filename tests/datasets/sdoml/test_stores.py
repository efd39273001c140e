"""Opening the stores, their layout errors, and frames read a chunk at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from sdofm.config import load_config
from sdofm.datasets.sdoml import (
    Archive,
    EVEStore,
    FrameError,
    ImageStore,
    LayoutError,
    StoreUnreachableError,
)

# --------------------------------------------------------------------------- opening and layout


def test_open_both_namings(synth_copy):
    cfg = load_config(None, [f"data.root={synth_copy}"])
    a = Archive.open(cfg.data, require=["aia", "hmi", "eve"])
    assert a.aia.url.endswith("sdomlv2.zarr") and a.eve.group.path == "MEGS-A"
    times = a.aia.frame_times("2012", "171A").times
    # SDO-FM's mounted names, with a flat EVE group.
    (synth_copy / "sdomlv2.zarr").rename(synth_copy / "AIA.zarr")
    (synth_copy / "sdomlv2_hmi.zarr").rename(synth_copy / "HMI.zarr")
    eve = synth_copy / "sdomlv2_eve.zarr"
    flat = synth_copy / "EVE_legacy.zarr"
    (eve / "MEGS-A").rename(flat)
    eve.joinpath(".zattrs").rename(flat / ".zattrs")
    shutil.rmtree(eve)
    b = Archive.open(cfg.data, require=["aia", "hmi", "eve"])
    assert b.aia.url.endswith("AIA.zarr") and b.hmi.url.endswith("HMI.zarr")
    assert isinstance(b.eve, EVEStore) and b.eve.group.path == "" and len(b.eve.lines) == 39
    np.testing.assert_array_equal(b.aia.frame_times("2012", "171A").times, times)


def test_missing_store_says_where_it_looked(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path}"])
    with pytest.raises(
        LayoutError,
        match=r"no AIA store under .*sdomlv2\.zarr, sdomlv2_small\.zarr, AIA\.zarr.*sdofm data synth",
    ):
        Archive.open(cfg.data)


def test_not_an_sdoml_store(tmp_path):
    g = zarr.open_group(tmp_path / "thing.zarr", mode="w", zarr_format=2)
    g.create_array("images", shape=(2, 4, 4), dtype="f4")
    with pytest.raises(LayoutError, match="is not an SDOML AIA store.*found \\['images'\\]"):
        ImageStore(str(tmp_path / "thing.zarr"), "aia")
    y = g.require_group("2011")
    y.create_array("cats", shape=(2, 4, 4), dtype="f4")
    with pytest.raises(LayoutError, match="year 2011 holds \\['cats'\\]"):
        ImageStore(str(tmp_path / "thing.zarr"), "aia")


def test_missing_year_and_channel_are_named(synth_copy):
    store = ImageStore(str(synth_copy / "sdomlv2.zarr"), "aia")
    with pytest.raises(LayoutError, match="missing year\\(s\\) 2013 \\(has 2012\\)"):
        store.validate(["171A"], ["2012", "2013"])
    shutil.rmtree(synth_copy / "sdomlv2.zarr" / "2012" / "304A")
    store = ImageStore(str(synth_copy / "sdomlv2.zarr"), "aia")
    with pytest.raises(LayoutError, match="year 2012 lacks channel\\(s\\) 304A"):
        store.validate(["171A", "304A"])


def test_wrong_shape_channel_is_a_layout_error(synth_copy):
    y = zarr.open_group(synth_copy / "sdomlv2.zarr" / "2012", mode="a", zarr_format=2)
    n = y["94A"].shape[0]
    a = y.create_array("94A", shape=(n, 16, 16), dtype="f4", overwrite=True)
    a.attrs["T_OBS"] = ["2012-06-29T00:00:00Z"] * n
    store = ImageStore(str(synth_copy / "sdomlv2.zarr"), "aia")
    with pytest.raises(LayoutError, match=r"frames of different shapes: .*\(16, 16\): 2012/94A"):
        store.validate(["94A", "171A"])


def test_unreachable_urls():
    with pytest.raises(StoreUnreachableError, match="does not exist"):
        ImageStore("/nonexistent/sdomlv2.zarr", "aia")
    cfg = load_config(None, ["data.root=http://127.0.0.1:9/sdoml", "data.aia_store=sdomlv2.zarr"])
    with pytest.raises(StoreUnreachableError, match="127.0.0.1:9"):
        Archive.open(cfg.data)


# --------------------------------------------------------------------------- frames


def test_read_frames_any_order_equals_direct_reads(synth_root):
    store = ImageStore(str(synth_root / "sdomlv2.zarr"), "aia")
    a = store.array("2012", "211A")
    idx = [17, 3, 40, 3, 8, 9, a.shape[0] - 1]
    got = store.read_frames("2012", "211A", idx)
    assert got.shape == (len(idx), 32, 32) and got.dtype == np.float32
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(got[j], a[i])


def test_corrupt_and_truncated_chunks_name_store_channel_and_frame(synth_copy):
    arr = synth_copy / "sdomlv2.zarr" / "2012" / "131A"
    (arr / "1.0.0").write_bytes(b"this is not blosc")  # frames 8..15 (8 per chunk)
    raw = (arr / "2.0.0").read_bytes()
    (arr / "2.0.0").write_bytes(raw[: len(raw) // 2])  # truncated
    store = ImageStore(str(synth_copy / "sdomlv2.zarr"), "aia")
    assert store.read_frames("2012", "131A", [0, 7]).shape == (2, 32, 32)  # other chunks still read
    with pytest.raises(
        FrameError,
        match=r"sdomlv2.zarr 2012/131A frame 9: cannot decode chunk 1\.0\.0 \(frames 9\.\.9\)",
    ) as e:
        store.read_frames("2012", "131A", [9])
    assert (e.value.year, e.value.channel, e.value.index) == ("2012", "131A", 9)
    with pytest.raises(FrameError, match="2012/131A frame 20"):
        store.read_frames("2012", "131A", [20])


def test_nan_frames_are_refused(synth_copy):
    a = zarr.open_array(synth_copy / "sdomlv2.zarr" / "2012" / "94A", mode="r+", zarr_format=2)
    block = a[0:8]
    block[2] = np.nan
    block[5, 0, 0] = np.inf
    a[0:8] = block
    store = ImageStore(str(synth_copy / "sdomlv2.zarr"), "aia")
    with pytest.raises(FrameError, match="2012/94A frame 2: all NaN"):
        store.read_frames("2012", "94A", [1, 2])
    with pytest.raises(FrameError, match="frame 5: 1 non-finite pixel"):
        store.read_frames("2012", "94A", [5])
    assert np.isnan(store.read_frames("2012", "94A", [2], check=False)).all()
    with pytest.raises(FrameError, match="index out of range"):
        store.read_frames("2012", "94A", [a.shape[0]])


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_frames_read_the_same_through_fsspec(synth_root, scheme):
    local = ImageStore(str(synth_root / "sdomlv2.zarr"), "aia")
    if scheme == "memory":
        import fsspec

        fsspec.filesystem("memory").put(
            str(synth_root / "sdomlv2.zarr"), "/frames/sdomlv2.zarr", recursive=True
        )
        url = "memory://frames/sdomlv2.zarr"
    else:
        url = f"file://{synth_root}/sdomlv2.zarr"
    remote = ImageStore(url, "aia")
    idx = [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        30,
        9,
        63,
    ]  # a whole chunk (0..7), scattered frames, repeats order
    np.testing.assert_array_equal(
        remote.read_frames("2012", "304A", idx), local.read_frames("2012", "304A", idx)
    )
    a = local.array("2012", "304A")
    np.testing.assert_array_equal(
        local.read_frames("2012", "304A", idx), a.get_orthogonal_selection((np.array(idx),))
    )


# --------------------------------------------------------------------------- chunk layouts

N_FRAMES = 250  # not a multiple of 15 or 120: the last chunk is partly used


def _layout_store(root: Path, chunks: tuple, separator: str = ".", filters=None) -> np.ndarray:
    """An AIA store whose 2012/171A has ``chunks``, written by zarr; returns its pixels."""
    from sdofm.archive.writer import compressor

    rng = np.random.default_rng(sum(chunks))
    pixels = rng.gamma(2.0, 50.0, (N_FRAMES, 32, 32)).astype(np.float32)
    year = zarr.open_group(root / "sdomlv2.zarr", mode="w", zarr_format=2).require_group("2012")
    a = year.create_array(
        "171A",
        shape=pixels.shape,
        chunks=chunks,
        dtype="float32",
        compressors=compressor(),
        filters=filters,
        fill_value=0.0,
        chunk_key_encoding={"name": "v2", "separator": separator},
    )
    a[:] = pixels
    a.attrs["T_OBS"] = [f"2012-01-01T00:{i // 60:02d}:{i % 60:02d}Z" for i in range(N_FRAMES)]
    return pixels


@pytest.mark.parametrize(
    "chunks,separator,filters",
    [
        ((1, 32, 32), ".", None),  # one frame per chunk
        ((15, 32, 32), ".", None),  # the SDOML v2 converter's chunks
        ((120, 32, 32), ".", None),  # the published sdomlv2_small stores'
        ((2, 16, 16), ".", None),  # tiles of frames
        ((1, 16, 16), "/", None),  # tiles, nested keys
        ((7, 20, 12), ".", None),  # tiles cut at the frame's edge
        ((15, 32, 32), ".", "shuffle"),  # a filter: read through zarr itself
    ],
)
def test_every_chunk_layout_reads_as_zarr_reads_it(tmp_path, chunks, separator, filters):
    import numcodecs

    filt = [numcodecs.Shuffle(elementsize=4)] if filters else None
    pixels = _layout_store(tmp_path, chunks, separator, filt)
    arr = tmp_path / "sdomlv2.zarr" / "2012" / "171A"
    ct, cy, cx = chunks
    (arr / separator.join([str(130 // ct), "0", "0"])).unlink()  # never written: fill value
    expect = pixels.copy()
    expect[130 // ct * ct : (130 // ct + 1) * ct, :cy, :cx] = 0
    a = zarr.open_array(arr, mode="r", zarr_format=2)
    store = ImageStore(str(tmp_path / "sdomlv2.zarr"), "aia")
    rng = np.random.default_rng(ct)
    edges = [0, ct - 1, ct, ct + 1, N_FRAMES - ct, N_FRAMES - 1, 130]
    for idx in (
        np.array(edges + list(rng.integers(0, N_FRAMES, 40))),  # unsorted, repeats
        np.sort(rng.choice(N_FRAMES, 60, replace=False)),
        np.arange(ct, min(3 * ct, N_FRAMES)),  # whole chunks, decoded in place
        np.array([N_FRAMES - 1, N_FRAMES - 1, 0]),
    ):
        want = a.get_orthogonal_selection((idx,))  # zarr's own read
        got = store.read_frames("2012", "171A", idx, check=False)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(want, expect[idx])
    buf = np.full((2 * ct, 32, 32), -1, np.float32)
    idx = np.arange(2 * ct)
    assert store.read_frames("2012", "171A", idx, out=buf) is buf
    np.testing.assert_array_equal(buf, a[: 2 * ct])

    # A corrupt chunk: its frames are named and NaN, the others still read.
    t = 60 // ct
    (arr / separator.join([str(t), "0", "0"])).write_bytes(b"garbage")
    errors: dict[int, str] = {}
    idx = np.arange(max(0, t * ct - 2), min(N_FRAMES, (t + 1) * ct + 2))
    got = store.read_frames("2012", "171A", idx, check=False, errors=errors)
    hit = (idx // ct) == t
    assert sorted(errors) == idx[hit].tolist()
    assert all(f"chunk {t}" in why for why in errors.values())
    assert np.isnan(got[hit]).all()
    np.testing.assert_array_equal(got[~hit], a.get_orthogonal_selection((idx[~hit],)))
    with pytest.raises(FrameError, match=rf"2012/171A frame {idx[hit][0]}: cannot"):
        store.read_frames("2012", "171A", idx)

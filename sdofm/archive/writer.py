"""The one frame writer of the SDOML v2 layout: year groups of ``(N, H, W)`` float32 arrays,
several frames per chunk, Blosc zstd 5 + bit-shuffle, per-frame header lists in ``.zattrs``.

The synthetic Sun (``sdofm.archive.synthetic``) and the FITS ingest
(``sdofm.archive.ingest``) both write through it.
"""

from __future__ import annotations

import numpy as np

from sdofm.datasets.sdoml import SDOMLError


def compressor():
    """The SDOML v2 codec: Blosc zstd level 5 with bit-shuffle."""
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


def create_frame_array(group, name: str, n_frames: int, size: int, frames_per_chunk: int):
    """The one way sdofm creates an SDOML image array: (N, H, W) float32, Blosc zstd 5 + bit-shuffle."""
    return group.create_array(
        name,
        shape=(n_frames, size, size),
        chunks=(frames_per_chunk, size, size),
        dtype="float32",
        compressors=compressor(),
        fill_value=0.0,
        overwrite=True,
    )


class FrameWriter:
    """Appends frames and their per-frame headers to one SDOML channel array.

    The one writer of image arrays: the synthetic Sun and ``sdofm data ingest``
    both write through it. Frames ``(H, W) float32`` are buffered and written a
    whole chunk at a time (no read-modify-write), compressed on ``pool`` when one
    is given. Headers become per-frame lists in the array's ``.zattrs`` under
    upper-case keys (None where a frame lacks a key), written by :meth:`commit`
    after the pixels: the length of ``T_OBS`` is the number of committed frames,
    so an interrupted append leaves at most uncommitted frames past its end.

    An existing array is appended to; one with more frames than its ``T_OBS``
    list, or of another frame size or dtype, is a :class:`SDOMLError`.
    ``reserve`` frames are allocated at once (one metadata write instead of one
    per chunk); :meth:`close` trims what was not used.
    """

    def __init__(
        self, group, name: str, size: int, frames_per_chunk: int, pool=None, reserve: int = 0
    ):
        self.pool, self.size = pool, size
        where = f"{group.store_path}/{name}"
        if name in group:
            self.array = group[name]
            a = self.array
            if a.ndim != 3 or tuple(a.shape[1:]) != (size, size) or a.dtype != np.float32:
                raise SDOMLError(
                    f"{where}: cannot append {size}x{size} float32 frames to an array of shape "
                    f"{a.shape}, dtype {a.dtype}"
                )
            attrs = dict(a.attrs)
            committed = len(attrs["T_OBS"]) if isinstance(attrs.get("T_OBS"), list) else 0
            if a.shape[0] != committed:
                raise SDOMLError(
                    f"{where}: holds {a.shape[0]} frames but its T_OBS list has {committed} "
                    "entries; cannot tell which frames are real"
                )
            # Lists of the wrong length exist in the archive: align them to T_OBS.
            self.attrs = {
                k: (v + [None] * committed)[:committed]
                for k, v in attrs.items()
                if isinstance(v, list)
            }
        else:
            self.array = create_frame_array(group, name, reserve, size, frames_per_chunk)
            committed = 0
            self.attrs = {}
        self.k = self.array.chunks[0]
        self.capacity = committed + reserve
        self.written = committed  # frames whose pixels are stored (or queued)
        self.committed = committed  # frames whose headers are stored
        self.buf: list[np.ndarray] = []
        self.pending: list = []

    @property
    def n_frames(self) -> int:
        """Frames added so far, including those not yet written: the index of the next one."""
        return self.written + len(self.buf)

    def add(self, frame: np.ndarray, header: dict) -> None:
        """Append one frame ``(H, W)`` and its header (JSON-able values)."""
        if frame.shape != (self.size, self.size):
            raise ValueError(f"frame of shape {frame.shape}, expected ({self.size}, {self.size})")
        n = self.n_frames
        for key, value in header.items():
            lst = self.attrs.setdefault(key.upper(), [None] * n)
            lst.append(value)
        for lst in self.attrs.values():
            if len(lst) == n:  # a key this frame lacks
                lst.append(None)
        self.buf.append(np.asarray(frame, dtype=np.float32))
        if self.n_frames % self.k == 0:  # whole chunks, also after a partial one
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        n, block = len(self.buf), np.stack(self.buf)
        lo = self.written
        if lo + n > self.array.shape[0]:
            self._wait()  # no write may be in flight while the metadata changes
            self.array.resize((max(lo + n, self.capacity), self.size, self.size))
        if self.pool is None:
            self.array[lo : lo + n] = block
        else:
            while len(self.pending) >= 2:  # bound the memory held by queued chunks
                self.pending.pop(0).result()  # .result() also raises a failed write
            self.pending.append(self.pool.submit(self.array.__setitem__, slice(lo, lo + n), block))
        self.written += n
        self.buf = []

    def _wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def commit(self) -> None:
        """Write buffered pixels, then the header lists: the frames so far become part of the store."""
        self.flush()
        self._wait()
        # One metadata write (attrs.update writes once per key). An array is never
        # without its T_OBS list, even before its first frame.
        self.array.update_attributes(self.attrs or {"T_OBS": []})
        self.committed = self.written

    def close(self) -> None:
        """Commit and trim allocated frames that were never written."""
        self.flush()
        self._wait()
        if self.array.shape[0] != self.written:
            self.array.resize((self.written, self.size, self.size))
        self.commit()

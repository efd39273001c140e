from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from sdofm import storage
from sdofm.storage import (
    exists,
    join,
    listdir,
    open_url,
    read_bytes,
    read_json,
    write_atomic,
    write_bytes,
    write_json,
)


class _NeedsTag(MemoryFileSystem):
    """A memory filesystem that can only be opened with its storage option ``tag``: every
    helper that forgets to pass the options fails."""

    protocol = "sdofmtagged"

    def __init__(self, *args, tag: str | None = None, **kwargs):
        if tag != "t1":
            raise ValueError(f"storage option tag='t1' did not reach the filesystem ({tag!r})")
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace(f"{cls.protocol}://", "memory://", 1))


@pytest.fixture
def tagged():
    fsspec.register_implementation(_NeedsTag.protocol, _NeedsTag, clobber=True)
    yield {"tag": "t1"}
    fs = MemoryFileSystem()
    if fs.exists("/bucket"):
        fs.rm("/bucket", recursive=True)


@pytest.fixture
def memory():
    yield "memory://sdofm-test-storage"
    fs = MemoryFileSystem()
    if fs.exists("/sdofm-test-storage"):
        fs.rm("/sdofm-test-storage", recursive=True)


# --------------------------------------------------------------------------- join


@pytest.mark.parametrize(
    "parts,joined",
    [
        (("s3://b/x", "run", "a"), "s3://b/x/run/a"),
        (("s3://b/x/", "run/", "a"), "s3://b/x/run/a"),
        (("s3://b/x//", "run//", "a/"), "s3://b/x/run/a"),
        (("memory://", "a", "b"), "memory://a/b"),
        (("/data/sdoml/", "sdomlv2.zarr"), "/data/sdoml/sdomlv2.zarr"),
        (("/", "x"), "/x"),
        (("relative/dir/", "f.json"), "relative/dir/f.json"),
        (("s3://b/x", "", "a"), "s3://b/x/a"),
        (("s3://b/x/",), "s3://b/x"),
        # A part that is a URL or an absolute path stands on its own (as os.path.join).
        (("/data", "/mnt/AIA.zarr"), "/mnt/AIA.zarr"),
        (("/data", "gs://bucket/AIA.zarr"), "gs://bucket/AIA.zarr"),
    ],
)
def test_join_normalises_slashes(parts, joined):
    assert join(*parts) == joined


def test_join_takes_paths():
    assert join(Path("/data/x"), "y") == "/data/x/y"


# --------------------------------------------------------------------------- opening


def test_open_url_local_path_and_file_url_are_the_same_place(tmp_path):
    fs1, p1 = open_url(tmp_path / "a" / "")
    fs2, p2 = open_url(f"file://{tmp_path}/a/")
    assert isinstance(fs1, LocalFileSystem) and isinstance(fs2, LocalFileSystem)
    assert p1 == p2 == f"{tmp_path}/a"


def test_options_reach_a_file_url(tmp_path):
    fs, path = open_url(f"file://{tmp_path}", {"auto_mkdir": True})
    assert fs.auto_mkdir is True and fs.storage_options == {"auto_mkdir": True}
    # auto_mkdir reaching the filesystem is what lets this write make its folders.
    with fs.open(f"{path}/new/folder/x.bin", "wb") as f:
        f.write(b"x")
    assert (tmp_path / "new" / "folder" / "x.bin").read_bytes() == b"x"
    fs, _ = open_url(f"file://{tmp_path}")
    assert fs.auto_mkdir is False


def test_options_reach_a_memory_url(memory):
    fs, path = open_url(f"{memory}/x/", {"custom": 3})
    assert isinstance(fs, MemoryFileSystem) and path == "/sdofm-test-storage/x"
    assert fs.storage_options == {"custom": 3}
    assert open_url(memory)[0].storage_options == {}


def test_every_helper_passes_the_options(tagged):
    url = "sdofmtagged://bucket/run"
    write_json(join(url, "state.json"), {"step": 3}, tagged)
    write_bytes(join(url, "model.pt"), b"weights", tagged)
    assert read_json(join(url, "state.json"), tagged) == {"step": 3}
    assert read_bytes(join(url, "model.pt"), tagged) == b"weights"
    assert exists(join(url, "model.pt"), tagged)
    assert listdir(url, tagged) == ["model.pt", "state.json"]
    with pytest.raises(ValueError, match="did not reach"):
        read_bytes(join(url, "model.pt"))


def test_object_store_options_are_harmless_on_a_local_folder(tmp_path):
    s3 = {"anon": True, "endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"region_name": "x"}}
    write_json(tmp_path / "a.json", [1, 2], s3)
    assert read_json(tmp_path / "a.json", s3) == [1, 2]


# --------------------------------------------------------------------------- atomic writes


class _DiskFull(OSError):
    pass


def _half_then_fail(self, path, value, **kwargs):
    """pipe_file that writes half of the bytes, then fails as a full disk does."""
    with open(path, "wb") as f:
        f.write(value[: len(value) // 2])
    raise _DiskFull("No space left on device")


def test_a_failed_local_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "run" / "state.json"
    write_bytes(target, b'{"step": 1}')
    monkeypatch.setattr(LocalFileSystem, "pipe_file", _half_then_fail)
    with pytest.raises(_DiskFull):
        write_bytes(target, b'{"step": 2, "and": "much more than before"}')
    assert target.read_bytes() == b'{"step": 1}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failed_first_local_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(LocalFileSystem, "pipe_file", _half_then_fail)
    with pytest.raises(_DiskFull):
        write_bytes(tmp_path / "shard.bin", b"0123456789")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError("rename refused")

    monkeypatch.setattr(LocalFileSystem, "mv", refuse)
    with pytest.raises(PermissionError):
        write_bytes(tmp_path / "x.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_local_write_makes_its_folder_and_replaces_the_file(tmp_path):
    target = tmp_path / "a" / "b" / "c.bin"
    write_bytes(target, b"one")
    write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["c.bin"]


def test_an_object_store_write_is_one_put_of_the_whole_file(memory, monkeypatch):
    fs, root = open_url(memory)
    calls = []

    def spy(name):
        real = getattr(fs, name)

        def call(path, *args, **kwargs):
            calls.append((name, path))
            return real(path, *args, **kwargs)

        return call

    for name in ("pipe_file", "mv", "copy", "rm_file", "makedirs"):
        monkeypatch.setattr(fs, name, spy(name))
    write_atomic(fs, f"{root}/k/state.json", b"{}")
    assert calls == [("pipe_file", f"{root}/k/state.json")]
    assert fs.cat_file(f"{root}/k/state.json") == b"{}"
    assert not storage.is_local(fs)


# --------------------------------------------------------------------------- reading


def test_reading_what_is_not_there(tmp_path, memory):
    for url in (tmp_path / "none.json", f"{memory}/none.json"):
        with pytest.raises(FileNotFoundError):
            read_bytes(url)
        with pytest.raises(FileNotFoundError):
            read_json(url)
        assert not exists(url)
    with pytest.raises(FileNotFoundError):
        listdir(tmp_path / "no-folder")


def test_listdir_names_entries_sorted_and_current(tmp_path):
    write_bytes(tmp_path / "b.bin", b"")
    write_bytes(tmp_path / "sub" / "a.bin", b"")
    assert listdir(tmp_path) == ["b.bin", "sub"]
    (tmp_path / "c.bin").write_bytes(b"")  # written behind sdofm's back
    assert listdir(f"file://{tmp_path}/") == ["b.bin", "c.bin", "sub"]

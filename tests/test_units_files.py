"""The file store: streamed files (hash, abort, kept write errors), files born in place and the
newest-bucket sweep, the disk watermark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomnode.store.files import DiskFull, FileStore


def test_streamed_file_equals_staged_file(tmp_path: Path) -> None:
    import blake3

    fs = FileStore(tmp_path, min_free_mb=0)
    data = os.urandom(700_000)
    stream = fs.open_stream(b"META")
    for k in range(0, len(data), 65536):  # fragments as they come off the network
        stream.write(memoryview(data)[k: k + 65536])
    staged = stream.finish()
    assert staged.size == 4 + len(data) and not stream.open
    assert stream.hasher.hexdigest() == blake3.blake3(data).hexdigest()
    assert fs.path_of(staged.rel_path).read_bytes() == b"META" + data
    bucket = fs.path_of(staged.rel_path).parent
    # abandoned half-way (peer gone): nothing left behind
    half = fs.open_stream(b"META")
    half.write(data[:1000])
    half.abort()
    half.abort()
    assert os.listdir(bucket) == [fs.path_of(staged.rel_path).name]


def test_stream_write_error_is_kept_and_reported_at_finish(tmp_path: Path) -> None:
    import errno

    fs = FileStore(tmp_path, min_free_mb=0)
    stream = fs.open_stream(b"META")
    stream.write(b"first")
    os.close(stream._fd)  # type: ignore[arg-type]  # the disk goes away under the stream
    stream._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail with EBADF
    stream.write(b"second")  # on the network thread: must not raise
    assert isinstance(stream.error, OSError) and stream.error.errno == errno.EBADF
    with pytest.raises(OSError):
        stream.finish()
    assert not stream.path.exists()
    with pytest.raises(DiskFull, match="min_free_mb"):
        FileStore(tmp_path, min_free_mb=10**9).open_stream(b"META")


def test_stage_and_sweep(tmp_path: Path) -> None:
    fs = FileStore(tmp_path, min_free_mb=0)
    a = fs.stage(b"META", b"DATASET-A")  # indexed and acknowledged
    fs.stage(b"META", b"PARTIAL")  # crashed before its index commit
    assert fs.path_of(a.rel_path).read_bytes() == b"METADATASET-A"
    # a store from before files were born in place: one indexed file still in tmp/, junk
    legacy = "2026010100-" + "ab" * 16
    (fs.tmp / f"{legacy}.dcm").write_bytes(b"METADATASET-B")
    (fs.tmp / "junk.part").write_bytes(b"x")
    from dicomnode.store.files import final_rel_path
    # an old bucket is never scanned (its unindexed file is somebody else's business)
    old = fs.root / "objects" / "20200101" / "00"
    old.mkdir(parents=True)
    (old / "foreign.dcm").write_bytes(b"x")
    indexed = {a.rel_path, final_rel_path(legacy)}
    forward, deleted = fs.sweep(
        lambda rel: rel if rel in indexed else None,
        lambda prefix: {p for p in indexed if p.startswith(prefix)})
    assert (forward, deleted) == (1, 2)
    assert fs.path_of(final_rel_path(legacy)).read_bytes() == b"METADATASET-B"
    assert fs.path_of(a.rel_path).read_bytes() == b"METADATASET-A"
    newest = fs.root / a.rel_path.rsplit("/", 1)[0]
    assert sorted(os.listdir(newest)) == [a.rel_path.rsplit("/", 1)[1]]  # PARTIAL is gone
    assert os.listdir(fs.tmp) == [] and os.listdir(old) == ["foreign.dcm"]


def test_watermark(tmp_path: Path) -> None:
    fs = FileStore(tmp_path, min_free_mb=10**9)
    with pytest.raises(DiskFull, match="min_free_mb"):
        fs.stage(b"", b"x")
    assert os.listdir(fs.tmp) == []

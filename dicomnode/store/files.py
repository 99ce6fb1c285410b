"""Instance files on disk, written so that nothing acknowledged is lost and nothing half-written
is ever indexed.

The protocol (one instance)::

    1. write tmp/<name>      → fsync file → fsync tmp/          (stage)
    2. commit the index row (path = objects/<day>/<hour>/<uuid>.dcm) (caller, in SQL)
    3. rename tmp/<name> → objects/<day>/<hour>/<uuid>.dcm → fsync that dir  (publish)
    4. only now answer the C-STORE with 0x0000

A crash before 2 leaves an unindexed file in ``tmp/``: the start-up sweep deletes it (the sender
never got a success, so it will send again). A crash between 2 and 3 leaves an indexed row whose
file still sits in ``tmp/``: the sweep finishes the rename (roll forward). So the sweep only ever
reads ``tmp/``; the object tree is never scanned. ``<name>`` is ``<YYYYMMDDHH>-<uuid>``: file names
never come from UIDs a peer sent us, and the final path is derived from the name alone.

Why hour buckets (not UID-hash fan-out): a new directory costs a mkdir and two extra directory
fsyncs; with hash fan-out nearly every instance of a fresh store pays that, with time buckets one
instance an hour does. Recent files also sit together, which suits retention and backups.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class DiskFull(OSError):
    """Not enough free space (below ``storage.min_free_mb`` or ENOSPC)."""


@dataclass(frozen=True)
class Staged:
    """A fully written, fsynced file in ``tmp/`` that is not yet published."""

    name: str
    rel_path: str  # where it will live, relative to the storage root
    size: int


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_sync_file_range = getattr(_libc, "sync_file_range", None)
_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_EVERY = 256 * 1024


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now (Linux ``sync_file_range``,
    no waiting): the final fsync then only waits for the tail. A no-op elsewhere."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length),
                         _SYNC_FILE_RANGE_WRITE)


class StreamingFile:
    """An instance written to ``tmp/`` *while it arrives*, hashed on the way.

    The receiver feeds it each P-DATA fragment (:meth:`write`); the kernel is asked to start
    write-back every 256 KiB, so when the last fragment is in, :meth:`finish` (fsync file and
    ``tmp/``) waits for little more than the tail. Same protocol as :meth:`FileStore.stage`
    from there on; a stream that is never finished is removed by :meth:`abort`, or by the
    start-up sweep after a crash (it is unindexed). Write errors are kept, not raised: the
    stream is fed from the network thread, and the store answers with the right status when
    the instance is complete.
    """

    def __init__(self, store: FileStore, name: str, meta: bytes) -> None:
        self.store = store
        self.name = name
        self.path = store.tmp / f"{name}.dcm"
        self.size = 0
        self.meta = meta
        self.error: OSError | None = None
        self.sha256 = hashlib.sha256()  # of the dataset, not the meta header
        self._synced = 0
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._write(memoryview(meta), hashed=False)

    def write(self, data: bytes | memoryview) -> None:
        self._write(memoryview(data), hashed=True)

    def _write(self, view: memoryview, hashed: bool) -> None:
        if hashed:
            self.sha256.update(view)
        if self.error is not None or self._fd is None:
            return
        try:
            FileStore._write_all(self._fd, view)
            self.size += len(view)
            if self.size - self._synced >= _WRITEBACK_EVERY:
                _start_writeback(self._fd, self._synced, self.size - self._synced)
                self._synced = self.size
        except OSError as e:
            self.error = e

    def finish(self) -> Staged:
        """Make the file durable in ``tmp/``; raises DiskFull or the write error it kept."""
        try:
            if self.error is not None:
                raise self.error
            self.store.check_space(0)
            fd, self._fd = self._fd, None
            if fd is None:
                raise OSError(errno.EBADF, "stream already closed")
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.store.tmp)
        except OSError as e:
            self.abort()
            if isinstance(e, DiskFull):
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(e.errno, f"disk full while writing: {e.strerror}") from e
            raise
        return Staged(self.name, final_rel_path(self.name), self.size)

    def abort(self) -> None:
        """Close and remove the file (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.path.unlink(missing_ok=True)

    @property
    def open(self) -> bool:
        return self._fd is not None


def final_rel_path(name: str) -> str:
    """``2026112105-<uuid>`` → ``objects/20261121/05/<uuid>.dcm``."""
    bucket, _, ident = name.partition("-")
    if len(bucket) != 10 or not bucket.isdigit() or len(ident) != 32:
        raise ValueError(f"not a staged file name: {name!r}")
    return f"objects/{bucket[:8]}/{bucket[8:]}/{ident}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    def __init__(self, root: Path, min_free_mb: int = 0) -> None:
        self.root = root.resolve()
        self.tmp = self.root / "tmp"
        self.objects = self.root / "objects"
        self.min_free_bytes = min_free_mb * 1024 * 1024
        for d in (self.root, self.tmp, self.objects):
            d.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[str] = set()

    # -- space -----------------------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, incoming: int) -> None:
        """Raise DiskFull if writing ``incoming`` bytes would go below the watermark."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise DiskFull(
                errno.ENOSPC,
                f"{free // 2**20} MiB free, {incoming // 2**20} MiB incoming, "
                f"storage.min_free_mb is {self.min_free_bytes // 2**20}",
            )

    # -- write path ------------------------------------------------------------------------
    def stage(self, meta: bytes, dataset: bytes | memoryview) -> Staged:
        """Write ``meta + dataset`` durably under tmp/ and return what to index."""
        self.check_space(len(meta) + len(dataset))
        name = f"{time.strftime('%Y%m%d%H', time.gmtime())}-{uuid.uuid4().hex}"
        tmp_path = self.tmp / f"{name}.dcm"
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                self._write_all(fd, memoryview(meta), memoryview(dataset))
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.tmp)
        except OSError as e:
            tmp_path.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(e.errno, f"disk full while writing: {e.strerror}") from e
            raise
        return Staged(name, final_rel_path(name), len(meta) + len(dataset))

    def open_stream(self, meta: bytes) -> StreamingFile:
        """A tmp/ file that a dataset is written into while it arrives (see StreamingFile)."""
        self.check_space(len(meta))
        name = f"{time.strftime('%Y%m%d%H', time.gmtime())}-{uuid.uuid4().hex}"
        return StreamingFile(self, name, meta)

    @staticmethod
    def _write_all(fd: int, *parts: memoryview) -> None:
        """One writev for the common case; loop on short writes."""
        views = [p for p in parts if len(p)]
        while views:
            n = os.writev(fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def publish(self, staged: Staged) -> None:
        """Move an indexed file into place and make the rename durable."""
        self._publish(staged.name, staged.rel_path)

    def _publish(self, name: str, rel_path: str) -> None:
        final = self.root / rel_path
        parent = final.parent
        key = str(parent)
        if key not in self._known_dirs:
            if not parent.exists():
                parent.mkdir(parents=True, exist_ok=True)
                _fsync_dir(parent.parent)
                _fsync_dir(parent.parent.parent)
            self._known_dirs.add(key)
        os.rename(self.tmp / f"{name}.dcm", final)
        _fsync_dir(parent)

    def discard(self, staged: Staged) -> None:
        (self.tmp / f"{staged.name}.dcm").unlink(missing_ok=True)

    def remove(self, rel_path: str) -> None:
        p = self.root / rel_path
        p.unlink(missing_ok=True)

    def path_of(self, rel_path: str) -> Path:
        return self.root / rel_path

    # -- recovery --------------------------------------------------------------------------
    def sweep(self, indexed_path: Callable[[str], str | None]) -> tuple[int, int]:
        """Finish or remove what a crash left in tmp/.

        ``indexed_path(rel_path)`` returns the rel_path if the index holds it, else None.
        Returns (rolled_forward, deleted).
        """
        forward = deleted = 0
        for entry in os.scandir(self.tmp):
            name, ext = os.path.splitext(entry.name)
            try:
                rel = indexed_path(final_rel_path(name)) if ext == ".dcm" else None
            except ValueError:
                rel = None  # not ours: a stray file, removed below
            if rel is not None:
                self._publish(name, rel)
                forward += 1
            else:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                deleted += 1
        if forward or deleted:
            _fsync_dir(self.tmp)
            log.warning("start-up sweep: %d file(s) rolled forward, %d stray file(s) removed",
                        forward, deleted)
        return forward, deleted

"""Instance files on disk, written so that nothing acknowledged is lost and nothing half-written
is ever indexed.

The protocol (one instance)::

    1. create objects/<day>/<hour>/<uuid>.dcm (O_EXCL) → fsync that directory
    2. write the data (as it arrives, write-back started every 256 KiB) → fsync the file
    3. commit the index row (caller, in SQL)
    4. only now answer the C-STORE with 0x0000

The file is born at its final path: no rename, so no second directory fsync, and step 1 runs
while the data is still arriving. Directory fsyncs of concurrent associations are shared
(:class:`GroupSync`), as are their index commits. A crash before 3 leaves an unindexed file in
the newest hour bucket(s): the start-up sweep deletes unindexed files there (the sender never got
a success, so it will send again). Readers only ever find files through the index, so an
unindexed file is never seen. ``<name>`` is ``<YYYYMMDDHH>-<uuid>``: file names never come from
UIDs a peer sent us, and the path is derived from the name alone.

Why hour buckets (not UID-hash fan-out): a new directory costs a mkdir and two extra directory
fsyncs; with hash fan-out nearly every instance of a fresh store pays that, with time buckets one
instance an hour does. Recent files also sit together, which suits retention, backups and the
start-up sweep (which reads only the newest buckets, never the whole tree).

Stores written by dicomnode before this layout staged files in ``tmp/`` and renamed them after
indexing; the sweep still finishes (indexed) or removes (unindexed) anything found there.
"""

from __future__ import annotations

import calendar
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomnode.store import digest

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


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now (Linux ``sync_file_range``,
    no waiting): the final fsync then only waits for the tail. A no-op elsewhere."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length),
                         _SYNC_FILE_RANGE_WRITE)


class StreamingFile:
    """An instance written to its final path *while it arrives*, hashed on the way.

    The receiver feeds it each P-DATA fragment (:meth:`write`); the kernel is asked to start
    write-back every 256 KiB, so when the last fragment is in, :meth:`finish` (fsync) waits for
    little more than the tail. Same protocol as :meth:`FileStore.stage` from there on; a
    stream that is never finished is removed by :meth:`abort`, or by the start-up sweep after a
    crash (it is unindexed). Write errors are kept, not raised: the stream is fed from the
    network thread, and the store answers with the right status when the instance is complete.
    """

    def __init__(self, store: FileStore, name: str, fd: int, meta: bytes) -> None:
        self.store = store
        self.name = name
        self.path = store.root / final_rel_path(name)
        self.size = 0
        self.meta = meta
        self.error: OSError | None = None
        self.hasher = digest.new()  # of the dataset, not the meta header
        self._synced = 0
        self._fd: int | None = fd
        self._write(memoryview(meta), hashed=False)

    def write(self, data: bytes | memoryview) -> None:
        self._write(memoryview(data), hashed=True)

    def _write(self, view: memoryview, hashed: bool) -> None:
        if hashed:
            self.hasher.update(view)
        if self.error is not None or self._fd is None:
            return
        try:
            FileStore._write_all(self._fd, view)
            self.size += len(view)
            if self.size - self._synced >= _WRITEBACK_EVERY:
                start_writeback(self._fd, self._synced, self.size - self._synced)
                self._synced = self.size
        except OSError as e:
            self.error = e

    def finish(self) -> Staged:
        """Make the file durable; raises DiskFull or the write error it kept."""
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


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed, removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """fsync one directory for many threads at once.

    Each caller has finished its own change (a create or a rename) before calling
    :meth:`sync`; a directory fsync makes every change made before it started durable. So one
    thread runs the fsync while the others wait, and all whose change was registered before it
    started return together: with N concurrent associations, one directory fsync instead of N
    in a row. A failed fsync raises in its caller and is retried by the next waiter.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cv = threading.Condition()
        self._requested = 0
        self._synced = 0
        self._running = False

    def sync(self) -> None:
        with self._cv:
            self._requested += 1
            mine = self._requested
            while self._synced < mine:
                if self._running:
                    self._cv.wait()
                    continue
                self._running = True
                target = self._requested
                ok = False
                self._cv.release()
                try:
                    fsync_dir(self.path)
                    ok = True
                finally:
                    self._cv.acquire()
                    self._running = False
                    if ok:
                        self._synced = max(self._synced, target)
                    self._cv.notify_all()


class FileStore:
    def __init__(self, root: Path, min_free_mb: int = 0) -> None:
        self.root = root.resolve()
        self.tmp = self.root / "tmp"
        self.objects = self.root / "objects"
        self.min_free_bytes = min_free_mb * 1024 * 1024
        for d in (self.root, self.tmp, self.objects):
            d.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[str] = set()
        self._dir_syncs: dict[Path, GroupSync] = {}
        self._dir_syncs_lock = threading.Lock()

    def _group_sync(self, path: Path) -> None:
        with self._dir_syncs_lock:
            group = self._dir_syncs.get(path)
            if group is None:
                if len(self._dir_syncs) > 64:  # old hour buckets
                    self._dir_syncs.clear()
                group = self._dir_syncs[path] = GroupSync(path)
        group.sync()

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
    def _bucket(self, name: str) -> Path:
        """The final directory of ``name``, created (durably) the first time."""
        parent = (self.root / final_rel_path(name)).parent
        key = str(parent)
        if key not in self._known_dirs:
            if not parent.exists():
                parent.mkdir(parents=True, exist_ok=True)
                fsync_dir(parent.parent)
                fsync_dir(parent.parent.parent)
            self._known_dirs.add(key)
        return parent

    def _create(self) -> tuple[str, int]:
        """A new, empty file at its final path whose directory entry is durable."""
        name = f"{time.strftime('%Y%m%d%H', time.gmtime())}-{uuid.uuid4().hex}"
        parent = self._bucket(name)
        fd = os.open(self.root / final_rel_path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o640)
        try:
            self._group_sync(parent)
        except BaseException:
            os.close(fd)
            (self.root / final_rel_path(name)).unlink(missing_ok=True)
            raise
        return name, fd

    def stage(self, meta: bytes, dataset: bytes | memoryview) -> Staged:
        """Write ``meta + dataset`` durably at its final path and return what to index."""
        self.check_space(len(meta) + len(dataset))
        name = ""
        try:
            name, fd = self._create()
            try:
                self._write_all(fd, memoryview(meta), memoryview(dataset))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            if name:
                (self.root / final_rel_path(name)).unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(e.errno, f"disk full while writing: {e.strerror}") from e
            raise
        return Staged(name, final_rel_path(name), len(meta) + len(dataset))

    def open_stream(self, meta: bytes) -> StreamingFile:
        """A file that a dataset is written into while it arrives (see StreamingFile)."""
        self.check_space(len(meta))
        name, fd = self._create()
        return StreamingFile(self, name, fd, meta)

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

    def discard(self, staged: Staged) -> None:
        """Remove a file that will not be indexed (duplicate, refused). Not fsynced: should
        the removal be lost in a crash, the start-up sweep removes the unindexed file."""
        (self.root / staged.rel_path).unlink(missing_ok=True)

    def remove(self, rel_path: str) -> None:
        p = self.root / rel_path
        p.unlink(missing_ok=True)

    def path_of(self, rel_path: str) -> Path:
        return self.root / rel_path

    # -- recovery --------------------------------------------------------------------------
    def newest_buckets(self, hours: int = 3) -> list[str]:
        """Relative paths of the newest hour buckets, spanning ``hours`` hours back from the
        newest one: where any file a crash left unindexed must be."""
        found: list[str] = []
        days = sorted((d.name for d in os.scandir(self.objects)
                       if d.is_dir() and len(d.name) == 8 and d.name.isdigit()), reverse=True)
        for day in days[:2]:
            for hour in sorted((h.name for h in os.scandir(self.objects / day)
                                if h.is_dir() and len(h.name) == 2 and h.name.isdigit()),
                               reverse=True):
                found.append(f"{day}{hour}")
        if not found:
            return []
        def seconds(bucket: str) -> int:  # bucket names are UTC
            return calendar.timegm(time.strptime(bucket, "%Y%m%d%H"))

        newest = seconds(found[0])
        keep = [b for b in found if newest - seconds(b) < hours * 3600]
        return [f"objects/{b[:8]}/{b[8:]}" for b in keep]

    def sweep(self, indexed_path: Callable[[str], str | None],
              indexed_under: Callable[[str], set[str]]) -> tuple[int, int]:
        """Finish or remove what a crash left behind: unindexed files in the newest buckets
        (written but never acknowledged) and anything in the legacy ``tmp/``.

        ``indexed_path(rel_path)`` returns the rel_path if the index holds it, else None;
        ``indexed_under(prefix)`` the indexed rel_paths under a bucket.
        Returns (rolled_forward, deleted).
        """
        forward = deleted = 0
        for bucket in self.newest_buckets():
            indexed = indexed_under(bucket + "/")
            removed = 0
            for entry in os.scandir(self.root / bucket):
                if f"{bucket}/{entry.name}" not in indexed and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
            if removed:
                fsync_dir(self.root / bucket)
                deleted += removed
        for entry in os.scandir(self.tmp):  # layout before files were born in place
            name, ext = os.path.splitext(entry.name)
            legacy: str | None
            try:
                legacy = indexed_path(final_rel_path(name)) if ext == ".dcm" else None
            except ValueError:
                legacy = None  # not ours: a stray file, removed below
            if legacy is not None:
                rel = legacy
                self._bucket(name)
                os.rename(entry.path, self.root / rel)
                fsync_dir((self.root / rel).parent)
                forward += 1
            else:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                deleted += 1
        if forward or deleted:
            fsync_dir(self.tmp)
            log.warning("start-up sweep: %d file(s) rolled forward, %d unindexed or stray "
                        "file(s) removed", forward, deleted)
        return forward, deleted

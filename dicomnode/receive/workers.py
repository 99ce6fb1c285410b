"""Receiving in several processes: ``node.receiver_processes``.

One Python process receives with one GIL: four scanners sending at once share one core's worth
of Python (the DUL reads, the C-STORE handler, the index transaction), however many cores the
machine has. With ``receiver_processes: N`` the node starts N − 1 *receiver workers* (spawned
processes, each with its own database connections, file store, audit log and pynetdicom AE)
beside its own receiver. The node still owns the one listening socket: each accepted connection
goes to the process with the fewest open associations — itself, or a worker, which gets the
connected socket over a Unix socketpair (``SCM_RIGHTS``) and runs the association exactly as
the node would. Everything a receiver writes is already safe with several writers: instance
rows (unique SOP Instance UID; SQLite ``BEGIN IMMEDIATE``, PostgreSQL row locks), the audit
chain (its head row is locked), association rows.

A worker tells the node which association rows it opened and closed (messages on the
socketpair) and which files it is writing (:class:`StreamTable`, a small memory-mapped file the
node reads only when the worker has died: a message per instance cost two system calls in the
worker and a thread wake-up in the node, per instance). If a worker dies (killed, crashed),
the node closes its open associations as ``interrupted`` (audited, as at start-up) so their
studies can complete, deletes the file it was writing unless that was indexed, and starts a
new worker; acknowledged instances are indexed and stay. A worker gets connections only once
it has said it is ready (a spawned worker takes ~1-5 s to import): until then, at start-up or
after a restart, the node runs them itself. A worker dies with the node
(PR_SET_PDEATHSIG). On SIGTERM the node stops accepting, then every worker finishes its
in-flight instances (the same grace period) and aborts its associations, as the node's own
receiver does.

``node.max_associations`` is split evenly across the processes (rounded up).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import multiprocessing
import os
import select as _select
import signal
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicomnode.audit import AuditLog
from dicomnode.config import Settings
from dicomnode.database import reading
from dicomnode.schema import AssociationState

log = logging.getLogger(__name__)

_STOP = b"stop\n"


class StreamTable:
    """Which file each association of a receiver worker is writing, in a memory-mapped file
    (``<storage>/receivers/<index>.streams``): written by the worker without a system call,
    read by the node only after the worker has died.

    One fixed-size slot per association: a 2-byte length, then the path (UTF-8). A slot is
    emptied by setting its length to 0 first, and filled by writing the path before its
    length, so a worker killed half-way leaves an empty slot or an old path, never a torn
    one. (A file a worker was killed while naming is unindexed, so the start-up sweep removes
    it.)"""

    SLOT = 1024

    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self.slots = slots
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, slots * self.SLOT)
            self._map = mmap.mmap(fd, slots * self.SLOT)
        finally:
            os.close(fd)
        self._owner: dict[int, int] = {}  # association key -> slot
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def record(self, key: int, path: str | None) -> None:
        """The file association ``key`` is writing now (None: none)."""
        with self._lock:
            slot = self._owner.get(key)
            if path is None:
                if slot is not None:
                    self._map[slot * self.SLOT:slot * self.SLOT + 2] = b"\0\0"
                    del self._owner[key]
                    self._free.append(slot)
                return
            if slot is None:
                if not self._free:
                    log.warning("no free stream slot: %s is not tracked", path)
                    return
                slot = self._owner[key] = self._free.pop()
            raw = path.encode()[:self.SLOT - 2]
            at = slot * self.SLOT
            self._map[at:at + 2] = b"\0\0"
            self._map[at + 2:at + 2 + len(raw)] = raw
            self._map[at:at + 2] = struct.pack("<H", len(raw))

    def close(self) -> None:
        self._map.close()

    @classmethod
    def read(cls, path: Path) -> set[str]:
        """The paths a (dead) worker's table names."""
        try:
            data = path.read_bytes()
        except OSError:
            return set()
        found = set()
        for at in range(0, len(data) - 1, cls.SLOT):
            (n,) = struct.unpack_from("<H", data, at)
            if 0 < n <= cls.SLOT - 2:
                found.add(data[at + 2:at + 2 + n].decode(errors="replace"))
        return found


def stream_table_path(storage_root: Path, index: int) -> Path:
    return Path(storage_root) / "receivers" / f"{index}.streams"


class _Worker:
    """The node's side of one receiver worker."""

    def __init__(self, index: int, settings: Settings) -> None:
        self.index = index
        # SEQPACKET: one message per hand-over (its descriptor with it) or report
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(target=worker_main, args=(settings, theirs, index),
                                   name=f"dicomnode-receiver-{index}", daemon=False)
        self.process.start()
        theirs.close()
        self.sock = ours
        self.active = 0  # connections handed over and not yet closed
        # set when the worker says it can run connections: a spawned worker imports for
        # ~1-5 s, and a connection handed to it before then would wait that long unanswered
        self.ready = False
        self.open_rows: set[int] = set()  # association rows the worker opened, not closed
        self.streams = stream_table_path(settings.storage.path, index)  # see StreamTable
        self.lock = threading.Lock()

    def hand_over(self, conn: socket.socket, address: tuple[Any, ...]) -> None:
        message = json.dumps({"address": list(address[:2])}).encode() + b"\n"
        with self.lock:
            socket.send_fds(self.sock, [message], [conn.fileno()])
            self.active += 1

    def read_reports(self) -> bool:
        """Read what the worker reports; False once it has gone (EOF)."""
        try:
            data = self.sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            return False
        with self.lock:
            for line in data.splitlines():  # SEQPACKET: one whole report per message
                kind, _, value = line.decode().partition(" ")
                if kind == "ready":
                    self.ready = True
                elif kind == "closed":
                    self.active = max(0, self.active - 1)
                elif kind == "open":
                    self.open_rows.add(int(value))
                elif kind == "finished":
                    self.open_rows.discard(int(value))
        return True


class ReceiverPool:
    """Starts the workers, hands each new connection to the least busy process, watches the
    workers (restarting one that dies), and stops them on shutdown."""

    def __init__(self, settings: Settings, sessions: Any, audit: AuditLog,
                 storage_root: Path) -> None:
        self.settings = settings
        self.storage_root = storage_root
        self.sessions = sessions
        self.audit = audit
        self.workers: list[_Worker] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self.local_active = 0  # connections the node's own receiver runs

    def local_report(self, line: str) -> None:
        """The node's own receiver's reports (see Receiver ``report``): its load."""
        if line == "closed":
            with self._lock:
                self.local_active = max(0, self.local_active - 1)

    def start(self) -> None:
        for i in range(1, self.settings.node.receiver_processes):
            self.workers.append(_Worker(i, self.settings))
        self._watcher = threading.Thread(target=self._watch, name="receiver-workers",
                                         daemon=True)
        self._watcher.start()

    def install(self, server: Any) -> None:
        """Route ``server``'s accepted connections: to this process or to a worker, whichever
        runs fewer connections (this process on a tie)."""
        local = server.process_request

        def run_here(request: socket.socket, client_address: Any) -> None:
            with self._lock:
                self.local_active += 1
            local(request, client_address)

        def process_request(request: socket.socket, client_address: Any) -> None:
            with self._lock:
                candidates = [] if self._stopping.is_set() else [
                    w for w in self.workers if w.ready and w.process.is_alive()]
                best = min(candidates, key=lambda w: w.active, default=None)
                here = best is None or self.local_active <= best.active
            if here or best is None:
                run_here(request, client_address)
                return
            try:
                best.hand_over(request, client_address)
            except OSError as e:
                log.warning("could not hand a connection to receiver %d (%s): taking it",
                            best.index, e)
                run_here(request, client_address)
                return
            request.close()  # the worker holds its own descriptor now

        server.process_request = process_request

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                workers = list(self.workers)
            socks = {w.sock.fileno(): w for w in workers}
            try:
                ready, _, _ = _select.select(list(socks), [], [], 0.5)
            except (OSError, ValueError):
                continue
            for fd in ready:
                w = socks[fd]
                if w.read_reports():
                    continue
                if self._stopping.is_set():
                    return
                self._replace(w)

    def _replace(self, dead: _Worker) -> None:
        from dicomnode.audit import EventKind, Outcome
        from dicomnode.receive.scp import finish_association
        from dicomnode.schema import Association

        dead.process.join(timeout=5)
        log.error("receiver process %d exited (%s); closing its %d association(s) and "
                  "starting a new one", dead.index, dead.process.exitcode,
                  len(dead.open_rows))
        removed = self._remove_partial(StreamTable.read(dead.streams))
        for row_id in sorted(dead.open_rows):
            with reading(self.sessions)() as s:
                row = s.get(Association, row_id)
                if row is None or row.state != AssociationState.OPEN:
                    continue
                calling, host, called = row.calling_aet, row.peer_host, row.called_aet
            finish_association(self.sessions, self.audit, row_id, AssociationState.INTERRUPTED,
                               calling=calling, host=host, called=called)
        self.audit.record(EventKind.RECEIVER_PROCESS_DIED, Outcome.SERIOUS_FAILURE,
                          process=dead.index,
                          exitcode=dead.process.exitcode,
                          interrupted_associations=sorted(dead.open_rows),
                          removed_partial=removed)
        dead.sock.close()
        with self._lock:
            self.workers[self.workers.index(dead)] = _Worker(dead.index, self.settings)

    def begin_stop(self) -> None:
        """No more hand-overs; every worker stops: finishes its in-flight instances, then
        closes its associations (in parallel with the node's own receiver)."""
        self._stopping.set()
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.sock.sendall(_STOP)

    def _remove_partial(self, paths: set[str]) -> int:
        """Delete the files a dead worker was receiving into, unless it indexed them before
        it died (its transaction either committed or is gone with its connection)."""
        from dicomnode.schema import Instance
        from dicomnode.store.files import fsync_dir

        removed = 0
        for path in sorted(paths):
            p = Path(path)
            try:
                rel = str(p.relative_to(self.storage_root))
            except ValueError:
                continue
            with reading(self.sessions)() as s:
                if s.execute(select(Instance.id).where(Instance.path == rel)).first():
                    continue
            if p.exists():
                p.unlink()
                fsync_dir(p.parent)
                removed += 1
        return removed

    def stop(self, grace_seconds: float) -> None:
        """Wait for the workers to stop (a worker that does not is killed)."""
        self.begin_stop()
        for w in self.workers:
            w.process.join(timeout=grace_seconds + 10)
            if w.process.is_alive():
                log.error("receiver process %d did not stop: killing it", w.index)
                w.process.kill()
                w.process.join(timeout=5)
            w.sock.close()
        if self._watcher is not None:
            self._watcher.join(timeout=2)


# -- the worker process ---------------------------------------------------------------------
def worker_main(settings: Settings, sock: socket.socket, index: int) -> None:
    from dicomnode.database import make_engine, make_sessionmaker
    from dicomnode.receive.scp import Receiver
    from dicomnode.runtime.memory import tune_allocator
    from dicomnode.runtime.process import configure_logging, die_with_parent
    from dicomnode.store import FileStore, InstanceStore

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops us (Ctrl-C reaches all)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tune_allocator()
    configure_logging(settings.logging.level)
    engine = make_engine(settings.database_url, settings.database.echo)
    sessions = make_sessionmaker(engine)
    audit = AuditLog(sessions)
    files = FileStore(settings.storage.path, settings.storage.min_free_mb)
    index_lock = threading.Lock()
    store = InstanceStore(files, sessions, audit, settings.storage.duplicate_policy, index_lock,
                          workers=settings.node.associations_per_process)
    send_lock = threading.Lock()

    def report(line: str) -> None:
        with send_lock, contextlib.suppress(OSError):
            sock.sendall(line.encode() + b"\n")

    streams = StreamTable(stream_table_path(settings.storage.path, index),
                          settings.node.associations_per_process + 8)
    receiver = Receiver(settings, store, sessions, audit, report=report, streams=streams.record)
    receiver.start_unbound()
    report("ready")  # from now on the node hands this process connections
    log.info("receiver process %d ready (pid %d)", index, os.getpid())
    try:
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
            if not msg and not fds:
                break  # the node is gone
            if not fds:
                if msg == _STOP:
                    break
                continue
            conn = socket.socket(fileno=fds[0])
            try:
                address = tuple(json.loads(msg)["address"])
            except (ValueError, KeyError, TypeError):
                address = ("", 0)
            log.debug("receiver process %d: connection from %s", index, address)
            receiver.take(conn, address)
    finally:
        receiver.stop(settings.node.shutdown_grace_seconds)
        store.close()
        engine.dispose()
        streams.close()
        log.info("receiver process %d stopped", index)

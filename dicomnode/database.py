"""Engine and session set-up, and schema migrations (Alembic scripts live in ``db/``).

SQLite is the embedded default: WAL journal, ``synchronous=FULL`` (a committed index row survives
power loss, not just a process crash) and ``BEGIN IMMEDIATE`` so a writer never fails half-way on
a lock upgrade. PostgreSQL is used as-is through psycopg 3.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "db"
READONLY = "dicomnode_readonly"
WRITER_WAIT = 30.0
_QUEUE, _HELD = "dicomnode_writers", "dicomnode_writer_held"

log = logging.getLogger(__name__)


class WriterQueue:
    """An advisory lock (``flock`` on ``<index>.writers``) that every write transaction on one
    SQLite index takes around BEGIN IMMEDIATE … COMMIT, in every process of the node.

    Why: waiting for SQLite's write lock means its busy handler, which sleeps 1, 2, 5, 10 … ms
    between tries. With ``node.receiver_processes: 2`` and four senders each process commits
    every millisecond or two, and each lost ~0.1 s per 150 instances waiting that way
    (bench/ingest), holding up its other association too. Here a waiter tries again every
    0.1–0.5 ms. SQLite's own locking still guards the data; the kernel drops the lock of a
    process that dies; after :data:`WRITER_WAIT` s without it (never expected) the
    transaction goes ahead and SQLite's lock decides. Each connection has its own open file
    (flock excludes open files, not processes), so threads of one process queue too.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def acquire(self) -> bool:
        deadline = 0.0
        delay = 0.0001
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                now = time.monotonic()
                if not deadline:
                    deadline = now + WRITER_WAIT
                elif now > deadline:
                    log.warning("index writer lock not free after %.0f s; going ahead", WRITER_WAIT)
                    return False
                time.sleep(delay)
                delay = min(delay * 1.5, 0.0005)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


def writers_path(url: str) -> str | None:
    """``<index>.writers`` for a SQLite file index, else None (PostgreSQL, in-memory)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return u.database + ".writers"


def _record_info(dbapi_conn: Any) -> Any:
    try:  # the pool's proxy; not the ad-hoc one of the engine's first connect
        return dbapi_conn.info
    except (AttributeError, NotImplementedError):
        return None


def _release_writer(info: Any) -> None:
    if info is not None and info.pop(_HELD, False):
        info[_QUEUE].release()


def make_engine(url: str, echo: bool = False) -> Engine:
    """Create an engine with the durability settings the node relies on."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(url, echo)
    if u.drivername == "postgresql":
        url = u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_engine(url: str, echo: bool) -> Engine:
    """SQLite: WAL, full sync, writers up front; on a file index, the writers' queue."""
    u = make_url(url)
    if u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, echo=echo, connect_args={"timeout": 60, "check_same_thread": False}
    )
    queue_path = writers_path(url)
    _sqlite_connections(engine, queue_path)
    if queue_path is not None:
        _release_writers_after_commit(engine)
    return engine


def _sqlite_connections(engine: Engine, queue_path: str | None) -> None:
    """Pragmas on every connection; ``BEGIN IMMEDIATE`` for writers (after the queue), a plain
    ``BEGIN`` for readers."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, rec: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()
        if queue_path is not None and _QUEUE not in rec.info:
            rec.info[_QUEUE] = WriterQueue(queue_path)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # writers take the write lock up front (no failed lock upgrades); readers never do,
        # so a long listing can't stall ingest. Writers queue on the flock first (see
        # WriterQueue), released once the DBAPI commit or rollback has returned.
        if conn.get_execution_options().get(READONLY, False):
            conn.exec_driver_sql("BEGIN")
            return
        if queue_path is None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            return
        info = conn.info
        queue = info.get(_QUEUE)
        if queue is not None and not info.get(_HELD) and queue.acquire():
            info[_HELD] = True
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release_writer(info)
            raise


def _release_writers_after_commit(engine: Engine) -> None:
    """Release the writers' queue once the DBAPI commit or rollback has returned, and whenever
    a connection leaves use (checked in, closed, invalidated)."""
    dialect = engine.dialect
    do_commit, do_rollback = dialect.do_commit, dialect.do_rollback

    def _commit(dbapi_conn: Any) -> None:
        try:
            do_commit(dbapi_conn)
        finally:
            _release_writer(_record_info(dbapi_conn))

    def _rollback(dbapi_conn: Any) -> None:
        try:
            do_rollback(dbapi_conn)
        finally:
            _release_writer(_record_info(dbapi_conn))

    # this engine's own dialect instance: commit/rollback events fire *before* the DBAPI
    # call, so the queue is released here, after it
    dialect.do_commit = _commit  # type: ignore[method-assign,assignment]
    dialect.do_rollback = _rollback  # type: ignore[method-assign,assignment]

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, rec: Any) -> None:
        _release_writer(rec.info)  # never kept by a connection back in the pool

    @event.listens_for(engine, "close")
    def _on_close(_dbapi_conn: Any, rec: Any) -> None:
        _release_writer(rec.info)
        queue = rec.info.pop(_QUEUE, None)
        if queue is not None:
            queue.close()

    @event.listens_for(engine, "invalidate")
    def _on_invalidate(_dbapi_conn: Any, rec: Any, _exc: Any) -> None:
        _release_writer(rec.info)


def make_sessionmaker(engine: Engine, readonly: bool = False) -> sessionmaker[Session]:
    """Sessions for writing, or (``readonly``) for reading without taking SQLite's write lock."""
    bind = engine.execution_options(**{READONLY: True}) if readonly else engine
    return sessionmaker(bind, expire_on_commit=False)


def reading(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """The read-only twin of ``sessions``: on SQLite a plain ``BEGIN`` (a snapshot), neither
    the write lock nor the writers' queue, so the node's pollers never hold up ingest."""
    return sessionmaker(sessions.kw["bind"].execution_options(**{READONLY: True}),
                        expire_on_commit=False)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic logs a dozen INFO lines per start ("setup plugin ...", "Context impl ...",
    "Will assume ..."): noise before anything useful. Keep them to warnings, unless the node
    logs at DEBUG, and let :func:`upgrade` say the outcome in one line."""
    alembic_log = logging.getLogger("alembic")
    if alembic_log.isEnabledFor(logging.DEBUG):
        yield
        return
    previous = alembic_log.level
    alembic_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        alembic_log.setLevel(previous)


def upgrade(url: str, revision: str = "head") -> str | None:
    """Bring the schema to ``revision`` (idempotent; the node runs it on start) and log one
    line with where it stands, e.g. "database schema at revision 0005 (head)". Returns the
    revision the database is at."""
    with _quiet_alembic():
        from alembic import command
        from alembic.script import ScriptDirectory

        cfg = _alembic_config(url)
        before = current_revision(url)  # also creates the SQLite folder if needed
        command.upgrade(cfg, revision)
        after = current_revision(url)
        head = ScriptDirectory.from_config(cfg).get_current_head()
    where = "head" if after == head else f"head is {head}"
    if before != after:
        where += f"; upgraded from {before}" if before else "; created"
    log.info("database schema at revision %s (%s)", after, where)
    return after


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn, _quiet_alembic():
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()

"""The one index transaction that runs for nearly every received instance, on the bare driver.

A study arrives as hundreds of instances of the same study and series. For every one but the
first, indexing is: "is this SOP Instance UID new? is its study/series still receiving? then bump
the counters and insert the row", in one transaction. Through the ORM session and SQLAlchemy Core
that cost ~1.5 ms of Python per instance — more than the fsyncs; here the same statements run on
one dedicated DBAPI connection (sqlite3 or psycopg) and cost a fraction of that.

Everything else (first instance of a study, duplicates, late instances re-opening a complete
study) returns :data:`SLOW_PATH` and is handled by the ORM code in :mod:`dicomnode.store.service`.
The caller holds the process-wide index lock, so one connection suffices; concurrent
associations share transactions through :class:`GroupCommit`. The transaction
semantics are the ORM path's: SQLite ``BEGIN IMMEDIATE`` (WAL, ``synchronous=FULL``), PostgreSQL
row locks on the study and series (the assembler may be completing them).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from dicomnode.database import WriterQueue, writers_path
from dicomnode.schema import UTCDateTime

log = logging.getLogger(__name__)

SLOW_PATH = False  # nothing was written: take the ORM path
__all__ = ["SLOW_PATH", "GroupCommit", "HotIndex", "WriterQueue"]


_EXISTING = "SELECT 1 FROM instances WHERE sop_instance_uid = :sop"
_STUDY = "SELECT id, state, revision FROM studies WHERE study_uid = :uid"
_SERIES = "SELECT id, state FROM series WHERE series_uid = :uid AND study_fk = :study"
_BUMP_STUDY = ("UPDATE studies SET num_instances = num_instances + 1, last_received_at = :now "
               "WHERE id = :row")
_BUMP_SERIES = ("UPDATE series SET num_instances = num_instances + 1, last_received_at = :now "
                "WHERE id = :row")
_INSERT = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_fk, study_fk, "
    "instance_number, transfer_syntax_uid, size, digest, path, study_revision, association_fk, "
    "received_at) VALUES (:sop_instance_uid, :sop_class_uid, :series_fk, :study_fk, "
    ":instance_number, :transfer_syntax_uid, :size, :digest, :path, :study_revision, "
    ":association_fk, :received_at)")
_BUMP_ASSOCIATION = ("UPDATE associations SET instances_received = instances_received + 1, "
                     "bytes_received = bytes_received + :size WHERE id = :row")


def _same(value: Any) -> Any:
    return value


class _Slot:
    __slots__ = ("done", "error", "request", "result")

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.done = False
        self.result = SLOW_PATH
        self.error: BaseException | None = None


class GroupCommit:
    """Concurrent associations share index transactions: whoever holds the index lock commits
    every request pending at that moment in one transaction, so N senders pay one commit
    (one fsync) per round instead of N, queued one behind the other. A single sender sees
    no difference. Each caller still returns only after the commit holding its row.
    """

    def __init__(self, hot: HotIndex, index_lock: threading.Lock) -> None:
        self.hot = hot
        self.index_lock = index_lock
        self._pending: list[_Slot] = []
        self._queue_lock = threading.Lock()

    def index(self, **request: Any) -> bool:
        slot = _Slot(request)
        with self._queue_lock:
            self._pending.append(slot)
        with self.index_lock:
            if not slot.done:  # nobody took it along: lead a batch of all that is pending
                with self._queue_lock:
                    batch, self._pending = self._pending, []
                try:
                    results = self.hot.index_batch([b.request for b in batch])
                except BaseException as e:
                    for b in batch:
                        b.error, b.done = e, True
                else:
                    for b, r in zip(batch, results, strict=True):
                        b.result, b.done = r, True
        if slot.error is not None:
            raise slot.error
        return slot.result


class HotIndex:
    """Index new instances of studies and series that are already receiving, or say
    :data:`SLOW_PATH`. Not thread-safe: call under the store's index lock."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        convert = (lambda sql: sql) if self.sqlite else (
            lambda sql: re.sub(r":(\w+)", r"%(\1)s", sql))
        lock = "" if self.sqlite else " FOR UPDATE"
        self.sql = {
            "existing": convert(_EXISTING), "study": convert(_STUDY) + lock,
            "series": convert(_SERIES) + lock, "bump_study": convert(_BUMP_STUDY),
            "bump_series": convert(_BUMP_SERIES), "insert": convert(_INSERT),
            "bump_association": convert(_BUMP_ASSOCIATION)}
        # the same queue on <index>.writers as every other write transaction (database.py)
        queue = writers_path(engine.url.render_as_string(hide_password=False))
        self.writers = WriterQueue(queue) if queue is not None else None
        dt = UTCDateTime().dialect_impl(engine.dialect)
        self._datetime: Callable[[Any], Any] = dt.bind_processor(engine.dialect) or _same
        self._raw: Any = None

    def _connection(self) -> Any:
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        return self._raw.driver_connection

    def close(self) -> None:
        if self.writers is not None:
            self.writers.close()
            self.writers = None
        if self._raw is not None:
            try:
                self._raw.close()
            finally:
                self._raw = None

    def index_batch(self, batch: list[dict[str, Any]]) -> list[bool]:
        """Index several new instances in ONE transaction (one commit, one fsync): for each,
        True (indexed) or SLOW_PATH (nothing written for it; use the ORM path). Raises if the
        commit fails, and then nothing of the batch is indexed."""
        locked = self.writers is not None and self.writers.acquire()
        try:
            return self._index_batch(batch)
        finally:
            if locked:
                assert self.writers is not None
                self.writers.release()

    def _index_batch(self, batch: list[dict[str, Any]]) -> list[bool]:
        conn = self._connection()
        results: list[bool] = []
        try:
            cur = conn.cursor()
            try:
                if self.sqlite:
                    cur.execute("BEGIN IMMEDIATE")
                for req in batch:
                    results.append(self._one(cur, req))
                if self.sqlite:
                    cur.execute("COMMIT")
                else:
                    conn.commit()
                return results
            finally:
                cur.close()
        except self.engine.dialect.loaded_dbapi.IntegrityError:
            # another process indexed one of these SOP Instance UIDs a moment ago (PostgreSQL):
            # nothing of the batch is kept; the ORM path sorts out duplicate vs conflict
            self._rollback_quietly(conn)
            return [SLOW_PATH] * len(batch)
        except BaseException:
            self._rollback_quietly(conn)
            # a broken connection (database restarted) is replaced on the next call
            raw, self._raw = self._raw, None
            if raw is not None:
                raw.invalidate()
            raise

    def _one(self, cur: Any, req: dict[str, Any]) -> bool:
        sql = self.sql
        cur.execute(sql["existing"], {"sop": req["sop_instance_uid"]})
        if cur.fetchone() is not None:
            return SLOW_PATH
        cur.execute(sql["study"], {"uid": req["study_uid"]})
        study = cur.fetchone()
        if study is None or study[1] != "receiving":
            return SLOW_PATH
        cur.execute(sql["series"], {"uid": req["series_uid"], "study": study[0]})
        series = cur.fetchone()
        if series is None or series[1] != "receiving":
            return SLOW_PATH
        stamp = self._datetime(req["now"])
        cur.execute(sql["bump_study"], {"row": study[0], "now": stamp})
        cur.execute(sql["bump_series"], {"row": series[0], "now": stamp})
        cur.execute(sql["insert"], {
            "sop_instance_uid": req["sop_instance_uid"], "sop_class_uid": req["sop_class_uid"],
            "series_fk": series[0], "study_fk": study[0],
            "instance_number": req["instance_number"],
            "transfer_syntax_uid": req["transfer_syntax_uid"], "size": req["size"],
            "digest": req["digest"], "path": req["path"], "study_revision": study[2],
            "association_fk": req["association_fk"], "received_at": stamp})
        if req["association_fk"] is not None:
            cur.execute(sql["bump_association"], {"row": req["association_fk"],
                                                  "size": req["size"]})
        return True

    def _rollback_quietly(self, conn: Any) -> None:
        try:
            if self.sqlite:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            else:
                conn.rollback()
        except Exception:  # the connection is being discarded anyway
            log.debug("rollback on a failing connection failed", exc_info=True)

"""The one index transaction that runs for nearly every received instance, on the bare driver.

A study arrives as hundreds of instances of the same study and series. For every one but the
first, indexing is: "is this SOP Instance UID new? is its study/series still receiving? then bump
the counters and insert the row", in one transaction. Through the ORM session and SQLAlchemy Core
that cost ~1.5 ms of Python per instance — more than the fsyncs; here the same statements run on
one dedicated DBAPI connection (sqlite3 or psycopg) and cost a fraction of that.

Everything else (first instance of a study, duplicates, late instances re-opening a complete
study) returns :data:`SLOW_PATH` and is handled by the ORM code in :mod:`dicomnode.store.service`.
The caller holds the process-wide index lock, so one connection suffices. The transaction
semantics are the ORM path's: SQLite ``BEGIN IMMEDIATE`` (WAL, ``synchronous=FULL``), PostgreSQL
row locks on the study and series (the assembler may be completing them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from dicomnode.schema import UTCDateTime

log = logging.getLogger(__name__)

SLOW_PATH = False  # nothing was written: take the ORM path

_EXISTING = "SELECT 1 FROM instances WHERE sop_instance_uid = :sop"
_STUDY = "SELECT id, state, revision FROM studies WHERE study_uid = :uid"
_SERIES = "SELECT id, state FROM series WHERE series_uid = :uid AND study_fk = :study"
_BUMP_STUDY = ("UPDATE studies SET num_instances = num_instances + 1, last_received_at = :now "
               "WHERE id = :row")
_BUMP_SERIES = ("UPDATE series SET num_instances = num_instances + 1, last_received_at = :now "
                "WHERE id = :row")
_INSERT = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_fk, study_fk, "
    "instance_number, transfer_syntax_uid, size, sha256, path, study_revision, association_fk, "
    "received_at) VALUES (:sop_instance_uid, :sop_class_uid, :series_fk, :study_fk, "
    ":instance_number, :transfer_syntax_uid, :size, :sha256, :path, :study_revision, "
    ":association_fk, :received_at)")
_BUMP_ASSOCIATION = ("UPDATE associations SET instances_received = instances_received + 1, "
                     "bytes_received = bytes_received + :size WHERE id = :row")


def _same(value: Any) -> Any:
    return value


class HotIndex:
    """Index a new instance of a study and series that are already receiving, or say
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
        dt = UTCDateTime().dialect_impl(engine.dialect)
        self._datetime: Callable[[Any], Any] = dt.bind_processor(engine.dialect) or _same
        self._raw: Any = None

    def _connection(self) -> Any:
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        return self._raw.driver_connection

    def close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            finally:
                self._raw = None

    def index(self, *, sop_instance_uid: str, sop_class_uid: str, study_uid: str,
              series_uid: str, instance_number: int | None, transfer_syntax_uid: str,
              size: int, sha256: str, path: str, association_fk: int | None,
              now: datetime) -> bool:
        """True: indexed and committed. SLOW_PATH: nothing written, use the ORM path."""
        conn = self._connection()
        try:
            cur = conn.cursor()
            try:
                if self.sqlite:
                    cur.execute("BEGIN IMMEDIATE")
                sql = self.sql
                cur.execute(sql["existing"], {"sop": sop_instance_uid})
                if cur.fetchone() is not None:
                    return self._abandon(conn, cur)
                cur.execute(sql["study"], {"uid": study_uid})
                study = cur.fetchone()
                if study is None or study[1] != "receiving":
                    return self._abandon(conn, cur)
                cur.execute(sql["series"], {"uid": series_uid, "study": study[0]})
                series = cur.fetchone()
                if series is None or series[1] != "receiving":
                    return self._abandon(conn, cur)
                stamp = self._datetime(now)
                cur.execute(sql["bump_study"], {"row": study[0], "now": stamp})
                cur.execute(sql["bump_series"], {"row": series[0], "now": stamp})
                cur.execute(sql["insert"], {
                    "sop_instance_uid": sop_instance_uid, "sop_class_uid": sop_class_uid,
                    "series_fk": series[0], "study_fk": study[0],
                    "instance_number": instance_number,
                    "transfer_syntax_uid": transfer_syntax_uid, "size": size,
                    "sha256": sha256, "path": path, "study_revision": study[2],
                    "association_fk": association_fk, "received_at": stamp})
                if association_fk is not None:
                    cur.execute(sql["bump_association"], {"row": association_fk, "size": size})
                if self.sqlite:
                    cur.execute("COMMIT")
                else:
                    conn.commit()
                return True
            finally:
                cur.close()
        except self.engine.dialect.loaded_dbapi.IntegrityError:
            # another association indexed the same SOP Instance UID a moment ago (PostgreSQL,
            # another process): the ORM path sorts out duplicate vs conflict
            self._rollback_quietly(conn)
            return SLOW_PATH
        except BaseException:
            self._rollback_quietly(conn)
            # a broken connection (database restarted) is replaced on the next call
            raw, self._raw = self._raw, None
            if raw is not None:
                raw.invalidate()
            raise

    def _abandon(self, conn: Any, cur: Any) -> bool:
        if self.sqlite:
            cur.execute("ROLLBACK")
        else:
            conn.rollback()
        return SLOW_PATH

    def _rollback_quietly(self, conn: Any) -> None:
        try:
            if self.sqlite:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            else:
                conn.rollback()
        except Exception:  # the connection is being discarded anyway
            log.debug("rollback on a failing connection failed", exc_info=True)

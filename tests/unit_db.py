"""A real SQLite index for unit tests: made by the project's own Alembic migrations (as
`dicomnode db upgrade` makes it), not by ``Base.metadata.create_all``."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.database import make_engine, make_sessionmaker, upgrade
from dicomnode.schema import AuditEvent


def migrated_sqlite(tmp_path: Path, name: str = "index.sqlite3"
                    ) -> tuple[Engine, sessionmaker[Session]]:
    """A fresh SQLite index at head under ``tmp_path``."""
    url = f"sqlite:///{tmp_path / name}"
    upgrade(url)
    engine = make_engine(url)
    return engine, make_sessionmaker(engine)


def audit_events(sessions: sessionmaker[Session], event_type: str
                 ) -> list[tuple[int, dict[str, object]]]:
    """(outcome, detail) of every audit event of one type, oldest first."""
    with sessions() as s:
        rows = s.execute(select(AuditEvent.outcome, AuditEvent.detail)
                         .where(AuditEvent.event_type == event_type)
                         .order_by(AuditEvent.seq)).all()
    return [(outcome, json.loads(detail)) for outcome, detail in rows]

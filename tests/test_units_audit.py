"""Audit: the PS3.15 vocabulary keeps one type name per kind; the hash chain links and verifies."""

from __future__ import annotations

from pathlib import Path

from dicomnode.audit import AuditLog, EventKind, Outcome, verify_chain
from dicomnode.database import make_engine, make_sessionmaker, upgrade


def test_event_kinds_are_distinct() -> None:
    # Enum members with equal values become aliases: that once recorded every 110104 event as
    # 'instances-received'. Every kind must keep its own type name.
    names = [k.type_name for k in EventKind]
    assert len(names) == len(EventKind.__members__) == len(set(names))
    assert EventKind.DUPLICATE_CONFLICT.type_name == "duplicate-conflict"
    assert EventKind.DUPLICATE_CONFLICT.code == "110104"


def test_chain_links_and_verifies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.sqlite3'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    log = AuditLog(sessions)
    for i in range(20):
        log.record(EventKind.STORE_REFUSED, Outcome.SERIOUS_FAILURE, source_aet="X", n=i)
    r = verify_chain(sessions)
    assert r.ok and r.checked == 20

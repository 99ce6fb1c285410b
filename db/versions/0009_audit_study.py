"""audit_event_studies (a study's audit trail by index), audit indexes by outcome and AE title

The console's audit page filters by study (Study Instance UID inside the detail JSON), by
outcome and by AE title, newest first. ``audit_event_studies`` is a search index beside the
hash chain: ``audit_events`` is not changed (no hashed content moves, no UPDATE), so
``verify_chain`` verifies old and new rows alike. Existing events are backfilled here.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 12:00:00
"""
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 5000


def _study_uids(detail: dict[str, Any]) -> list[str]:
    # the same rule as dicomnode.audit.log.study_uids, frozen here as of this revision
    found: list[str] = []
    uid = detail.get("study_uid")
    if isinstance(uid, str) and uid:
        found.append(uid)
    studies = detail.get("studies")
    if isinstance(studies, dict | list):
        found += [u for u in studies if isinstance(u, str) and u]
    return sorted({u[:64] for u in found})


def _backfill() -> None:
    bind = op.get_bind()
    table = sa.table('audit_event_studies', sa.column('study_uid', sa.String),
                     sa.column('seq', sa.BigInteger))
    last = 0
    while True:  # pages by seq: flat memory on a big trail, on both databases
        rows = bind.execute(sa.text(
            "SELECT seq, detail FROM audit_events WHERE seq > :last ORDER BY seq LIMIT :n"),
            {"last": last, "n": BATCH}).all()
        if not rows:
            return
        last = rows[-1][0]
        batch: list[dict[str, Any]] = []
        for seq, detail in rows:
            if '"stud' not in detail:
                continue
            try:
                parsed = json.loads(detail)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                batch += [{"study_uid": u, "seq": seq} for u in _study_uids(parsed)]
        if batch:
            bind.execute(table.insert(), batch)


def _append_only() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for what in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_event_studies_no_{what.lower()} BEFORE {what} ON "
                "audit_event_studies BEGIN SELECT RAISE(ABORT, "
                "'audit_event_studies is append-only'); END")
    else:
        op.execute(
            "CREATE FUNCTION audit_event_studies_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
            "'audit_event_studies is append-only'; END $$")
        op.execute(
            "CREATE TRIGGER audit_event_studies_append_only BEFORE UPDATE OR DELETE ON "
            "audit_event_studies FOR EACH ROW EXECUTE FUNCTION "
            "audit_event_studies_append_only()")


def upgrade() -> None:
    op.create_table(
        'audit_event_studies',
        sa.Column('study_uid', sa.String(64), nullable=False),
        sa.Column('seq', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('study_uid', 'seq', name=op.f('pk_audit_event_studies')),
    )
    op.create_index('ix_audit_events_outcome_seq', 'audit_events', ['outcome', 'seq'])
    op.create_index('ix_audit_events_source_aet_seq', 'audit_events', ['source_aet', 'seq'])
    op.create_index('ix_audit_events_dest_aet_seq', 'audit_events', ['dest_aet', 'seq'])
    _backfill()
    _append_only()


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_event_studies_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_event_studies_no_delete")
    op.drop_table('audit_event_studies')
    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP FUNCTION IF EXISTS audit_event_studies_append_only()")
    op.drop_index('ix_audit_events_dest_aet_seq', 'audit_events')
    op.drop_index('ix_audit_events_source_aet_seq', 'audit_events')
    op.drop_index('ix_audit_events_outcome_seq', 'audit_events')

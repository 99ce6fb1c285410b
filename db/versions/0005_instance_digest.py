"""instances.sha256 → instances.digest ('<algorithm>:<hex>'; BLAKE3 for new instances)

Existing rows keep their SHA-256, labelled: 'sha256:<hex>'. Duplicates of those are still
recognised (dicomnode/store/digest.py hashes the new bytes with SHA-256 to compare).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 01:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot rename or widen a column in place (the table is copied)
    with op.batch_alter_table('instances') as batch:
        batch.alter_column('sha256', new_column_name='digest', existing_type=sa.String(64),
                           type_=sa.String(80), existing_nullable=False)
    op.execute("UPDATE instances SET digest = 'sha256:' || digest")


def downgrade() -> None:
    # only SHA-256 digests fit the old column; BLAKE3 ones cannot be turned back into SHA-256
    # without reading every file, so they are kept with their label (the column is widened)
    op.execute("UPDATE instances SET digest = substr(digest, 8) WHERE digest LIKE 'sha256:%'")
    with op.batch_alter_table('instances') as batch:
        batch.alter_column('digest', new_column_name='sha256', existing_type=sa.String(80),
                           existing_nullable=False)

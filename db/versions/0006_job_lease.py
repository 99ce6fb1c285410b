"""jobs.lease_owner, jobs.lease_expires_at: a running job is leased to one runner worker

A runner renews the lease of each job it runs; any runner queues again a running job whose
lease expired (its worker died or lost the database), so no job state assumes one process.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 13:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('lease_owner', sa.String(128), nullable=False,
                                   server_default=''))
        batch.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True),
                                   nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('lease_expires_at')
        batch.drop_column('lease_owner')

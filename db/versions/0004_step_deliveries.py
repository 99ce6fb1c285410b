"""deliveries and notifications per pipeline step (results sent while later steps run)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 14:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot alter constraints in place (the table is copied)
    with op.batch_alter_table('deliveries') as batch:
        batch.add_column(sa.Column('step', sa.Integer(), nullable=False, server_default='-1'))
        batch.add_column(sa.Column('results', sa.Text(), nullable=True))
        batch.drop_constraint('uq_deliveries_job_dest', type_='unique')
        batch.create_unique_constraint('uq_deliveries_job_dest_step',
                                       ['job_fk', 'destination', 'step'])
    with op.batch_alter_table('notifications') as batch:
        batch.add_column(sa.Column('step', sa.Integer(), nullable=False, server_default='-1'))


def downgrade() -> None:
    with op.batch_alter_table('notifications') as batch:
        batch.drop_column('step')
    with op.batch_alter_table('deliveries') as batch:
        batch.drop_constraint('uq_deliveries_job_dest_step', type_='unique')
        batch.create_unique_constraint('uq_deliveries_job_dest', ['job_fk', 'destination'])
        batch.drop_column('results')
        batch.drop_column('step')

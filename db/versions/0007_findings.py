"""findings, finding_reviews: AI findings indexed from result SRs, and radiologists' verdicts

Each TID 1500 measurement group of a result SR becomes a ``findings`` row when its job step is
recorded (unique per SR and tracking UID); a radiologist's decision is a ``finding_reviews`` row
(one per finding) with the verdict SR it sent to PACS.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'findings',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_fk', sa.Integer(), nullable=False),
        sa.Column('study_uid', sa.String(64), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('sr_path', sa.Text(), nullable=False),
        sa.Column('sr_sop_instance_uid', sa.String(64), nullable=False),
        sa.Column('tracking_uid', sa.String(64), nullable=False),
        sa.Column('tracking_id', sa.String(64), nullable=False),
        sa.Column('group_index', sa.Integer(), nullable=False),
        sa.Column('finding_value', sa.String(64), nullable=False),
        sa.Column('finding_scheme', sa.String(16), nullable=False),
        sa.Column('finding_meaning', sa.String(128), nullable=False),
        sa.Column('site', sa.String(128), nullable=False),
        sa.Column('laterality', sa.String(64), nullable=False),
        sa.Column('confidence', sa.Float(), nullable=True),
        sa.Column('measurements', sa.Text(), nullable=False),
        sa.Column('evaluations', sa.Text(), nullable=False),
        sa.Column('seg_sop_instance_uid', sa.String(64), nullable=True),
        sa.Column('seg_path', sa.Text(), nullable=True),
        sa.Column('segment_number', sa.Integer(), nullable=True),
        sa.Column('location', sa.Text(), nullable=True),
        sa.Column('key_images', sa.Text(), nullable=False),
        sa.Column('priority', sa.Integer(), nullable=False),
        sa.Column('critical', sa.Text(), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('reviewed_by', sa.String(64), nullable=False),
        sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_fk'], ['jobs.id'], name='fk_findings_job_fk_jobs'),
        sa.PrimaryKeyConstraint('id', name='pk_findings'),
        sa.UniqueConstraint('sr_sop_instance_uid', 'tracking_uid',
                            name='uq_findings_sr_tracking'),
    )
    op.create_index('ix_findings_job_fk', 'findings', ['job_fk'])
    op.create_index('ix_findings_study_uid', 'findings', ['study_uid'])
    op.create_index('ix_findings_sr_sop_instance_uid', 'findings', ['sr_sop_instance_uid'])
    op.create_index('ix_findings_status', 'findings', ['status'])
    op.create_index('ix_findings_worklist', 'findings', ['status', 'priority', 'created_at'])
    op.create_table(
        'finding_reviews',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('finding_fk', sa.Integer(), nullable=False),
        sa.Column('decision', sa.String(16), nullable=False),
        sa.Column('comment', sa.Text(), nullable=False),
        sa.Column('user', sa.String(64), nullable=False),
        sa.Column('user_display', sa.String(324), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('verdict_sop_instance_uid', sa.String(64), nullable=False),
        sa.Column('verdict_path', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['finding_fk'], ['findings.id'],
                                name='fk_finding_reviews_finding_fk_findings'),
        sa.PrimaryKeyConstraint('id', name='pk_finding_reviews'),
        sa.UniqueConstraint('finding_fk', name='uq_finding_reviews_finding_fk'),
        sa.UniqueConstraint('verdict_sop_instance_uid',
                            name='uq_finding_reviews_verdict_sop_instance_uid'),
    )


def downgrade() -> None:
    op.drop_table('finding_reviews')
    op.drop_index('ix_findings_worklist', table_name='findings')
    op.drop_index('ix_findings_status', table_name='findings')
    op.drop_index('ix_findings_sr_sop_instance_uid', table_name='findings')
    op.drop_index('ix_findings_study_uid', table_name='findings')
    op.drop_index('ix_findings_job_fk', table_name='findings')
    op.drop_table('findings')

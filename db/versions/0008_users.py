"""users, web_sessions: people who use the web console and the REST API

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 18:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'users',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('display_name', sa.String(128), nullable=False),
        sa.Column('role', sa.String(16), nullable=False),
        sa.Column('password_hash', sa.String(256), nullable=False),
        sa.Column('sso_subject', sa.String(255), nullable=True),
        sa.Column('disabled', sa.Boolean(), nullable=False),
        sa.Column('failed_logins', sa.Integer(), nullable=False),
        sa.Column('locked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_failed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
        sa.UniqueConstraint('name', name=op.f('uq_users_name')),
        sa.UniqueConstraint('sso_subject', name=op.f('uq_users_sso_subject')),
    )
    op.create_table(
        'web_sessions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('token_hash', sa.String(64), nullable=False),
        sa.Column('user_fk', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(8), nullable=False),
        sa.Column('csrf_token', sa.String(64), nullable=False),
        sa.Column('remote', sa.String(64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['user_fk'], ['users.id'],
                                name=op.f('fk_web_sessions_user_fk_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_web_sessions')),
        sa.UniqueConstraint('token_hash', name=op.f('uq_web_sessions_token_hash')),
    )
    op.create_index(op.f('ix_web_sessions_user_fk'), 'web_sessions', ['user_fk'])
    op.create_index(op.f('ix_web_sessions_expires_at'), 'web_sessions', ['expires_at'])
    # the audit page filters by user and outcome, newest first: without these a filtered page
    # scans the whole table (bench/web.py)
    op.create_index('ix_audit_events_user_seq', 'audit_events', ['user', 'seq'])
    op.create_index('ix_audit_events_type_seq', 'audit_events', ['event_type', 'seq'])


def downgrade() -> None:
    op.drop_index('ix_audit_events_type_seq', 'audit_events')
    op.drop_index('ix_audit_events_user_seq', 'audit_events')
    op.drop_table('web_sessions')
    op.drop_table('users')

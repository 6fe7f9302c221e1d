"""api nonces and idempotency keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_nonces',
    sa.Column('signature', sa.String(length=128), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('signature')
    )
    with op.batch_alter_table('api_nonces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_nonces_expires_at'), ['expires_at'], unique=False)

    op.create_table('api_idempotency_keys',
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('request_sha256', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )


def downgrade() -> None:
    op.drop_table('api_idempotency_keys')
    with op.batch_alter_table('api_nonces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_nonces_expires_at'))

    op.drop_table('api_nonces')

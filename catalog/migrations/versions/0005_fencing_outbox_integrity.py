"""fencing tokens, outbox and give-up on jobs; manifest checksums on restore points

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fence', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('dispatch_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('sends', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('give_up', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_dispatch_at'), ['dispatch_at'], unique=False)
    with op.batch_alter_table('restore_points', schema=None) as batch_op:
        batch_op.add_column(sa.Column('manifest_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('verified_at', sa.DateTime(timezone=True), nullable=True))
    # Queued jobs of an older release get a message again from the sweeper.
    op.execute("UPDATE jobs SET dispatch_at = created_at WHERE state = 'queued'")


def downgrade() -> None:
    with op.batch_alter_table('restore_points', schema=None) as batch_op:
        batch_op.drop_column('verified_at')
        batch_op.drop_column('manifest_sha256')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_dispatch_at'))
        batch_op.drop_column('give_up')
        batch_op.drop_column('sends')
        batch_op.drop_column('dispatch_at')
        batch_op.drop_column('fence')

"""indexes for pruning the rows of deleted snapshots and of merged or abandoned overlays

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""
from __future__ import annotations

from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_snapshots_state_deleted_at', 'snapshots', ['state', 'deleted_at'])
    op.create_index('ix_overlays_state_created_at', 'overlays', ['state', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_overlays_state_created_at', table_name='overlays')
    op.drop_index('ix_snapshots_state_deleted_at', table_name='snapshots')

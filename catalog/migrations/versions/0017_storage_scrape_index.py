"""a covering index for the metrics of what each storage target holds: live points'
count and stored bytes by storage and format

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""
from __future__ import annotations

from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_restore_points_status_storage_size', 'restore_points',
                    ['status', 'storage', 'format', 'size_bytes'])


def downgrade() -> None:
    op.drop_index('ix_restore_points_status_storage_size', table_name='restore_points')

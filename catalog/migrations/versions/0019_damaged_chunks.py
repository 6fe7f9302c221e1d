"""format-2 chunks found damaged that could not be deleted: the next backup that
produces their data stores them again

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-08
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'damaged_chunks',
        sa.Column('storage', sa.String(length=128), nullable=False),
        sa.Column('chunk', sa.String(length=64), nullable=False),
        sa.Column('found_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('found_by', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('storage', 'chunk'),
    )


def downgrade() -> None:
    op.drop_table('damaged_chunks')

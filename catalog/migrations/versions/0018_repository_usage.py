"""what each format-2 repository holds as its last gc counted it, and whether points
left it since (the trigger of the automatic gc)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'repository_usage',
        sa.Column('storage', sa.String(length=128), nullable=False),
        sa.Column('garbage_since', sa.DateTime(timezone=True), nullable=True),
        sa.Column('garbage_last', sa.DateTime(timezone=True), nullable=True),
        sa.Column('gc_started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('gc_finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('gc_deferred', sa.Text(), nullable=True),
        sa.Column('points', sa.Integer(), nullable=True),
        sa.Column('chunks', sa.BigInteger(), nullable=True),
        sa.Column('stored_bytes', sa.BigInteger(), nullable=True),
        sa.Column('logical_bytes', sa.BigInteger(), nullable=True),
        sa.Column('deleted_chunks', sa.BigInteger(), nullable=False),
        sa.Column('deleted_bytes', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('storage'),
    )


def downgrade() -> None:
    op.drop_table('repository_usage')

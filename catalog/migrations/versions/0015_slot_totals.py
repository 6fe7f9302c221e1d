"""running count of skipped schedule slots by job kind and cause, for the metrics

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'slot_totals',
        sa.Column('job', sa.String(length=32), nullable=False),
        sa.Column('cause', sa.String(length=16), nullable=False),
        sa.Column('slots', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('job', 'cause'),
    )


def downgrade() -> None:
    op.drop_table('slot_totals')

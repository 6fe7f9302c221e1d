"""running totals of finished jobs by kind, outcome and duration bucket, for the metrics

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_totals',
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('le', sa.String(length=16), nullable=False),
        sa.Column('jobs', sa.BigInteger(), nullable=False),
        sa.Column('seconds', sa.Float(), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('kind', 'outcome', 'le'),
    )


def downgrade() -> None:
    op.drop_table('job_totals')

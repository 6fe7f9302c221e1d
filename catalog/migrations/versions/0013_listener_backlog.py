"""what a listener reports with its row: the events waiting for its dispatcher and how
long the oldest of them has waited

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('services') as batch:
        batch.add_column(sa.Column('backlog', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('lag_seconds', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('services') as batch:
        batch.drop_column('lag_seconds')
        batch.drop_column('backlog')

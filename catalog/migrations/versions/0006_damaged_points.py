"""damaged restore points: what a verification found

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('restore_points', schema=None) as batch_op:
        batch_op.add_column(sa.Column('damage', sa.Text(), nullable=True))


def downgrade() -> None:
    # A damaged point is not restorable; an older release knows no such status, so it
    # must not find any: they go back to 'complete' only if their damage is forgotten,
    # which would list them as restorable. Keep them unlisted as 'failed' instead.
    op.execute("UPDATE restore_points SET status = 'failed', reason = damage WHERE status = 'damaged'")
    with op.batch_alter_table('restore_points', schema=None) as batch_op:
        batch_op.drop_column('damage')

"""covering indexes for what every metrics scrape reads: jobs counted by kind and state,
and each domain's newest complete restore point

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""
from __future__ import annotations

from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_kind_state', 'jobs', ['kind', 'state'])
    op.create_index('ix_restore_points_status_domain_created_at', 'restore_points', ['status', 'domain', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_restore_points_status_domain_created_at', table_name='restore_points')
    op.drop_index('ix_jobs_kind_state', table_name='jobs')

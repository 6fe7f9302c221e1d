"""indexes for the paths every tick and every listing take through a long history:
schedule_slots by state (deferred and unsent slots) and jobs by creation time

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""
from __future__ import annotations

from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_schedule_slots_state_job_id', 'schedule_slots', ['state', 'job_id'])
    op.create_index('ix_jobs_created_at', 'jobs', ['created_at'])


def downgrade() -> None:
    op.drop_index('ix_jobs_created_at', table_name='jobs')
    op.drop_index('ix_schedule_slots_state_job_id', table_name='schedule_slots')

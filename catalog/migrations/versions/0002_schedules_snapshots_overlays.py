"""schedules snapshots overlays

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('overlays',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('target', sa.String(length=32), nullable=False),
    sa.Column('overlay_path', sa.String(length=1024), nullable=False),
    sa.Column('base_path', sa.String(length=1024), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('overlays', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_overlays_domain'), ['domain'], unique=False)
        batch_op.create_index(batch_op.f('ix_overlays_job_id'), ['job_id'], unique=False)

    op.create_table('schedule_slots',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('policy', sa.String(length=128), nullable=False),
    sa.Column('job', sa.String(length=32), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('slot_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('window_end', sa.DateTime(timezone=True), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('policy', 'job', 'domain', 'slot_at', name='uq_schedule_slot')
    )
    with op.batch_alter_table('schedule_slots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_schedule_slots_slot_at'), ['slot_at'], unique=False)

    op.create_table('snapshots',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('domain_uuid', sa.String(length=36), nullable=False),
    sa.Column('host', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('policy', sa.String(length=128), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('consistency', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_snapshots_domain'), ['domain'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_snapshots_domain'))

    op.drop_table('snapshots')
    with op.batch_alter_table('schedule_slots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_schedule_slots_slot_at'))

    op.drop_table('schedule_slots')
    with op.batch_alter_table('overlays', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_overlays_job_id'))
        batch_op.drop_index(batch_op.f('ix_overlays_domain'))

    op.drop_table('overlays')

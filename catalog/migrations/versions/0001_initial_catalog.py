"""initial catalog

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('domain_locks',
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('domain')
    )
    op.create_table('domains',
    sa.Column('uuid', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('host', sa.String(length=128), nullable=True),
    sa.Column('state', sa.String(length=32), nullable=True),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('uuid')
    )
    with op.batch_alter_table('domains', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_domains_name'), ['name'], unique=False)

    op.create_table('events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('host', sa.String(length=128), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=True),
    sa.Column('domain_uuid', sa.String(length=36), nullable=True),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.String(length=255), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_domain'), ['domain'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_received_at'), ['received_at'], unique=False)

    op.create_table('hosts',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('uri', sa.String(length=512), nullable=False),
    sa.Column('group', sa.String(length=128), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('jobs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=True),
    sa.Column('host', sa.String(length=128), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('progress_text', sa.String(length=255), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=255), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('dedup_key', sa.String(length=255), nullable=True),
    sa.Column('requested_by', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dedup_key')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_domain'), ['domain'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_lease_expires_at'), ['lease_expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)

    op.create_table('restore_points',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('domain_uuid', sa.String(length=36), nullable=False),
    sa.Column('host', sa.String(length=128), nullable=False),
    sa.Column('storage', sa.String(length=128), nullable=False),
    sa.Column('strategy', sa.String(length=32), nullable=False),
    sa.Column('chain_id', sa.String(length=36), nullable=False),
    sa.Column('parent_id', sa.String(length=36), nullable=True),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('level', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('consistency', sa.String(length=16), nullable=False),
    sa.Column('checkpoint', sa.String(length=255), nullable=True),
    sa.Column('manifest_key', sa.String(length=1024), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('restore_points', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_restore_points_chain_id'), ['chain_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_restore_points_domain'), ['domain'], unique=False)
        batch_op.create_index(batch_op.f('ix_restore_points_domain_uuid'), ['domain_uuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_restore_points_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_restore_points_status'), ['status'], unique=False)

    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('point_id', sa.String(length=36), nullable=False),
    sa.Column('target', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=1024), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('virtual_size', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['point_id'], ['restore_points.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifacts_point_id'), ['point_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifacts_point_id'))

    op.drop_table('artifacts')
    with op.batch_alter_table('restore_points', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_restore_points_status'))
        batch_op.drop_index(batch_op.f('ix_restore_points_job_id'))
        batch_op.drop_index(batch_op.f('ix_restore_points_domain_uuid'))
        batch_op.drop_index(batch_op.f('ix_restore_points_domain'))
        batch_op.drop_index(batch_op.f('ix_restore_points_chain_id'))

    op.drop_table('restore_points')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_jobs_lease_expires_at'))
        batch_op.drop_index(batch_op.f('ix_jobs_domain'))

    op.drop_table('jobs')
    op.drop_table('hosts')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_received_at'))
        batch_op.drop_index(batch_op.f('ix_events_domain'))

    op.drop_table('events')
    with op.batch_alter_table('domains', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_domains_name'))

    op.drop_table('domains')
    op.drop_table('domain_locks')

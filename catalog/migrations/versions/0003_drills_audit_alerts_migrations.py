"""drills audit alerts migrations host state

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('alerts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('fingerprint', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('host', sa.String(length=128), nullable=True),
    sa.Column('action', sa.String(length=32), nullable=True),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('starts_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('fingerprint', 'starts_at', name='uq_alert_occurrence')
    )
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alerts_fingerprint'), ['fingerprint'], unique=False)

    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('action', sa.String(length=128), nullable=False),
    sa.Column('target', sa.String(length=255), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_job_id'), ['job_id'], unique=False)

    op.create_table('drills',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('point_id', sa.String(length=36), nullable=True),
    sa.Column('host', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False, server_default='unknown'),
    sa.Column('throwaway', sa.String(length=255), nullable=True),
    sa.Column('checks', sa.JSON(), nullable=False),
    sa.Column('restore_seconds', sa.Float(), nullable=True),
    sa.Column('boot_seconds', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('cleaned_up', sa.Boolean(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('drills', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_drills_domain'), ['domain'], unique=False)

    op.create_table('migrations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('domain_uuid', sa.String(length=36), nullable=True),
    sa.Column('from_host', sa.String(length=128), nullable=False),
    sa.Column('to_host', sa.String(length=128), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('downtime_ms', sa.Integer(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('migrations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_migrations_domain'), ['domain'], unique=False)
        batch_op.create_index(batch_op.f('ix_migrations_job_id'), ['job_id'], unique=False)

    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('state', sa.String(length=16), nullable=False, server_default='unknown'))
        batch_op.add_column(sa.Column('last_error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('capacity', sa.JSON(), nullable=True))

    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.add_column(sa.Column('state', sa.String(length=16), nullable=False, server_default='present'))



def downgrade() -> None:
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.drop_column('state')

    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_column('capacity')
        batch_op.drop_column('last_error')
        batch_op.drop_column('state')

    with op.batch_alter_table('migrations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_migrations_job_id'))
        batch_op.drop_index(batch_op.f('ix_migrations_domain'))

    op.drop_table('migrations')
    with op.batch_alter_table('drills', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_drills_domain'))

    op.drop_table('drills')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_job_id'))
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))

    op.drop_table('audit_log')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alerts_fingerprint'))

    op.drop_table('alerts')

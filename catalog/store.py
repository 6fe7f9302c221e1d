"""Opening the catalog: engine, schema upgrade through Alembic, sessions.

SQLite (the default, one machine) runs in WAL mode with a busy timeout so the CLI, the
workers and the listener can share one file; PostgreSQL is used by URL for a fleet.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from virtwarden.catalog.reader import MIGRATIONS, newest_revision, pg_connect_args

from virtwarden import permissions
from virtwarden.errors import ConfigError, DatabaseUnavailable
from virtwarden.redact import mask as _mask

if TYPE_CHECKING:
    from virtwarden.catalog.fencing import Fence

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines drown ours
_upgrade_lock = threading.Lock()


class Catalog:
    """Holds the engine and hands out sessions; the operations live in catalog.jobs and
    catalog.points as functions over a session."""

    fence: Fence | None = None

    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        self.url = url
        self.engine = _engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if upgrade:
            self.upgrade()

    def fenced(self, fence: Fence) -> Catalog:
        """This catalog (same engine) as one job attempt sees it: every transaction that
        writes anything first checks, in that transaction, that the attempt still holds
        the job (``catalog.fencing.guard``) and is rolled back with LeaseLost when it
        does not. Reads stay plain reads."""
        other = copy.copy(self)
        other.fence = fence
        other._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(other._sessions, "do_orm_execute", other._guard_statement)
        event.listen(other._sessions, "before_flush", other._guard_flush)
        return other

    def check_owner(self, action: str) -> None:
        """Right before a step that changes something outside the catalog: LeaseLost
        unless this attempt still holds its job (a no-op for an unfenced catalog)."""
        if self.fence is None:
            return
        from virtwarden.catalog.fencing import guard

        with self.session() as s:
            guard(s.connection(), self.fence, action)
            s.info["guarded"] = True

    def _guard_statement(self, state: Any) -> None:
        if state.is_update or state.is_delete or state.is_insert:
            self._guard(state.session)

    def _guard_flush(self, session: Session, _context: Any, _instances: Any) -> None:
        if session.new or session.dirty or session.deleted:
            self._guard(session)

    def _guard(self, session: Session) -> None:
        if session.info.get("guarded") or self.fence is None:
            return
        from virtwarden.catalog.fencing import guard

        session.info["guarded"] = True
        guard(session.connection(), self.fence)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        try:
            with self._sessions.begin() as s:
                yield s
        except OperationalError as e:
            raise DatabaseUnavailable(_mask(f"catalog {self.url}: {e.orig}")) from e

    def upgrade(self) -> None:
        """Bring the schema to the newest revision (no-op when it is there)."""
        if self._current():  # what almost every open finds: one read, and Alembic never imported
            return
        from alembic import command
        from alembic.config import Config as AlembicConfig
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        script = ScriptDirectory.from_config(cfg)
        head = script.get_current_head()

        try:
            # Several processes may open a new catalog at once (a fleet's first start):
            # one upgrades, the others wait for it and then find the schema current.
            with _upgrade_lock, self._exclusive(), self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7423001)")
                current = MigrationContext.configure(conn).get_current_revision()
                if current == head:
                    return
                if current is not None and current not in {s.revision for s in script.walk_revisions()}:
                    raise ConfigError(f"catalog {mask(self.url)} is at schema revision {current}, which this"
                                      f" virtwarden does not know (its newest is {head}): a newer release"
                                      " wrote it; run that release, or a catalog from before it")
                cfg.attributes["connection"] = conn
                log.info("upgrading catalog %s to schema %s", mask(self.url), head)
                command.upgrade(cfg, "head")
        except SQLAlchemyError as e:
            reason = e.orig if isinstance(e, OperationalError) else e
            raise DatabaseUnavailable(_mask(f"catalog {self.url} unreachable or not upgradable: {reason}")) from e

    def _current(self) -> bool:
        """Whether the schema is at the newest revision already (False when unsure: the
        full check under the upgrade lock decides then)."""
        try:
            with self.engine.connect() as conn:
                row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
        except SQLAlchemyError:
            return False
        return row is not None and row[0] == newest_revision()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """For SQLite, a lock file beside the database (its DDL is not transactional
        under Alembic); PostgreSQL uses an advisory lock inside the transaction."""
        path = self.url.split("///", 1)[-1] if self.url.startswith("sqlite") else ""
        if not path or path == ":memory:":
            yield
            return
        lock = f"{path}.upgrade-lock"
        with contextlib.suppress(FileExistsError):
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        permissions.secure_catalog_file_if_mine(lock)
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def close(self) -> None:
        self.engine.dispose()


def dialect_insert(s: Session, table: Any) -> Any:
    """The INSERT of the session's database that knows ``ON CONFLICT`` (SQLite's or
    PostgreSQL's, the two the catalog supports)."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = s.get_bind().dialect.name
    inserts: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
    if dialect not in inserts:
        raise NotImplementedError(f"no INSERT ... ON CONFLICT for {dialect}")
    return inserts[dialect](table)


def upsert(s: Session, table: Any, key: dict[str, Any], values: dict[str, Any], *,
           add: tuple[str, ...] = ()) -> Any:
    """``INSERT ... ON CONFLICT (key) DO UPDATE``, one atomic statement on both databases
    the catalog supports: a new row gets ``values``; an existing one gets them too, except
    the columns named in ``add``, to which the new values are added (running totals)."""
    stmt = dialect_insert(s, table).values(**key, **values)
    return stmt.on_conflict_do_update(
        index_elements=list(key),
        set_={c: (getattr(table, c) + stmt.excluded[c]) if c in add else stmt.excluded[c] for c in values})


def _engine(url: str) -> Engine:
    try:
        if url.startswith("sqlite"):
            return _sqlite_engine(url)
        parsed = make_url(url)
        psycopg2 = parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg2"
        args: dict[str, Any] = {}
        if psycopg2:
            # A server that stops answering fails the call instead of holding it for ever
            # (catalog/reader.py: pg_connect_args); the URL's own settings win.
            from psycopg2.extensions import libpq_version

            args = pg_connect_args(parsed.query, libpq_version())
        engine = create_engine(url, pool_pre_ping=True, connect_args=args)
        if psycopg2:
            event.listen(engine, "connect", _end_idle_transactions)
        return engine
    except ImportError as e:  # SQLAlchemy imports the URL's driver when it makes the engine
        raise ConfigError(_missing_driver(url, e)) from e


def _missing_driver(url: str, error: ImportError) -> str:
    """What to install when the driver a catalog URL names is missing. PostgreSQL's driver
    psycopg2 comes with the `postgres` extra, since a one-machine install on SQLite needs
    none; a postgresql:// URL without a driver means psycopg 3 to SQLAlchemy 2.1."""
    name = error.name or str(error)
    what = f"catalog {mask(url)}: its database driver {name} is not installed"
    extra = "install virtwarden with its PostgreSQL extra: pip install 'virtwarden[postgres]'"
    if not url.startswith("postgresql"):
        return f"{what}; install the Python package that provides it"
    if name == "psycopg2":
        return f"{what}; {extra}"
    return f"{what}; install it, or name psycopg2 in the URL (postgresql+psycopg2://...) and {extra}"


PG_IDLE_IN_TRANSACTION_SECONDS = 300


def _end_idle_transactions(dbapi_conn, _record) -> None:
    """Have the server end this session when it sits idle inside a transaction for
    ``PG_IDLE_IN_TRANSACTION_SECONDS`` (unless the server, the role or the URL set a
    limit already). A process stopped in the middle of a transaction (SIGSTOP: its
    kernel still answers TCP keepalives; a paused VM: the server's keepalives give up
    after hours by default) would otherwise hold the rows it updated for as long as it
    is stopped, its job's row among them: no other worker
    could take the job over, and every reaper would wait on that row. The catalog's
    transactions are meant to hold rows for their statements only: 300 s is far beyond
    any of them."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("SHOW idle_in_transaction_session_timeout")
        (current,) = cur.fetchone()
        if str(current) in ("0", "0ms"):
            cur.execute(f"SET idle_in_transaction_session_timeout = {PG_IDLE_IN_TRANSACTION_SECONDS * 1000}")
        dbapi_conn.commit()
    finally:
        cur.close()


def _sqlite_engine(url: str) -> Engine:
    path = url.split("///", 1)[-1]
    on_disk = bool(path) and path != ":memory:" and not path.startswith("file:")
    if on_disk:
        # The catalog is private (0600; 0660 for security.service_group), created so
        # before SQLite opens it; its WAL and shared-memory files follow its mode.
        permissions.prepare_catalog(path)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()
        if on_disk:
            for suffix in ("-wal", "-shm", "-journal"):
                permissions.secure_catalog_file_if_mine(path + suffix)

    return engine


def mask(url: str) -> str:
    """The URL without its password (``virtwarden.redact.mask``), for messages and logs."""
    return _mask(url)

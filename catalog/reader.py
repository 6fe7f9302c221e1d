"""The catalog's listings for commands that must answer at once (``virtwarden jobs``,
``job ID``, ``backups``, ``alerts``, ``services``, ``snapshots``, ``drills``,
``schedule slots``): plain SQL through the DB-API driver the catalog URL names
(``sqlite3``, ``psycopg2``), without SQLAlchemy, whose import alone takes about 0.2 s,
most of a read-only command's start-up.

Each function returns exactly what the catalog module it mirrors returns (the views of
``catalog.views``; tests/test_catalog_reader.py holds the two to the same answers on
SQLite and PostgreSQL). It answers only from a catalog it can trust as it is: one that
exists and is at the newest schema revision, through a driver it knows. Anything else
(no catalog yet, an older schema, another driver, a connection that fails) goes to the
full catalog (``catalog.store``), which creates or upgrades the schema and reports
errors the way every other command does.

``newest_revision`` lives here too: the full catalog compares with it before it would
import Alembic, and this module must not import ``catalog.store``.
"""
from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from virtwarden.catalog.views import (
    CREATING,
    PRESENT,
    AlertView,
    ArtifactView,
    DrillView,
    JobView,
    PointView,
    ServiceView,
    SlotRow,
    SnapshotView,
)

from virtwarden import permissions
from virtwarden.errors import DatabaseUnavailable, JobNotFound
from virtwarden.redact import mask

MIGRATIONS = Path(__file__).with_name("migrations")


@functools.cache
def newest_revision() -> str:
    """The schema revision the newest migration makes, from the migration files' names
    (``NNNN_what.py``, revision ``NNNN``: tests/test_catalog.py checks that Alembic agrees),
    so that opening a current catalog needs no Alembic at all."""
    return max(p.name.split("_", 1)[0] for p in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def recent_jobs(url: str, *, limit: int = 50, domain: str | None = None) -> list[JobView]:
    """``catalog.jobs.recent``: the newest ``limit`` jobs (of ``domain``), newest first."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import jobs

            return jobs.recent(_full(url), limit=limit, domain=domain)
        return db.views(JobView, "jobs", _where(domain=domain), "created_at DESC", limit)


def job(url: str, job_id: str) -> JobView:
    """``catalog.jobs.get``: one job; JobNotFound when there is none of that id."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import jobs

            return jobs.get(_full(url), job_id)
        found = db.views(JobView, "jobs", ("id = ?", [job_id]))
        if not found:
            raise JobNotFound(f"no job {job_id!r}")
        return found[0]


def domain_points(url: str, domain: str) -> list[PointView]:
    """``catalog.points.for_domain``: a domain's points (by name), oldest first."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import points

            return points.for_domain(_full(url), domain)
        arts: dict[str, list[ArtifactView]] = {}
        for point_id, art in db.views(ArtifactView, "artifacts", ("point_id IN (SELECT id FROM restore_points"
                                                                   " WHERE domain = ?)", [domain]),
                                      "target", extra="point_id"):
            arts.setdefault(point_id, []).append(art)
        return [replace(p, artifacts=tuple(arts.get(p.id, ()))) for p in
                db.views(PointView, "restore_points", _where(domain=domain), "created_at, seq")]


def recent_alerts(url: str, *, limit: int = 100, host: str | None = None) -> list[AlertView]:
    """``catalog.alerts.recent``: the last ``limit`` occurrences received (of ``host``),
    oldest first."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import alerts

            return alerts.recent(_full(url), limit=limit, host=host)
        where = ("host = ?", [host]) if host is not None else ("", [])
        return db.views(AlertView, "alerts", where, "id DESC", limit)[::-1]


def services(url: str) -> list[ServiceView]:
    """``catalog.services.listed``: each daemon's row."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import services as rows

            return rows.listed(_full(url))
        return db.views(ServiceView, "services", ("", []), "kind, node, hosts")


def domain_snapshots(url: str, domain: str, *, include_deleted: bool = False) -> list[SnapshotView]:
    """``catalog.snapshots.for_domain``: the snapshots of a domain, oldest first."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import snapshots

            return snapshots.for_domain(_full(url), domain, include_deleted=include_deleted)
        where = ("domain = ?", [domain]) if include_deleted else \
            ("domain = ? AND state IN (?, ?)", [domain, CREATING, PRESENT])
        return db.views(SnapshotView, "snapshots", where, "created_at, id")


def recent_drills(url: str, *, domain: str | None = None, limit: int = 50) -> list[DrillView]:
    """``catalog.drills.recent``: the newest drills (of ``domain``) first."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import drills

            return drills.recent(_full(url), domain=domain, limit=limit)
        return db.views(DrillView, "drills", _where(domain=domain), "started_at DESC", limit)


def recent_slots(url: str, *, since: datetime, state: str | None = None, domain: str | None = None,
                 limit: int = 1000) -> list[SlotRow]:
    """``catalog.slots.recent``: slots at ``since`` or later, newest first."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import slots

            return slots.recent(_full(url), since=since, state=state, domain=domain, limit=limit)
        where, args = _where(state=state, domain=domain)
        return db.views(SlotRow, "schedule_slots", (" AND ".join(filter(None, ["slot_at >= ?", where])),
                                                     [db.time(since), *args]), "slot_at DESC, id DESC", limit)


def _full(url: str) -> Any:
    """The full catalog, for what the reader leaves to it."""
    from virtwarden.catalog.store import Catalog

    return Catalog(url)


def _where(**equal: str | None) -> tuple[str, list[Any]]:
    """``column = ?`` for each value given (None or empty: not a condition, as in the
    catalog modules)."""
    given = {k: v for k, v in equal.items() if v}
    return " AND ".join(f"{k} = ?" for k in given), list(given.values())


class _Db:
    """One DB-API connection: ``?`` placeholders, and rows made into views whose fields
    are their table's column names, each value decoded as the catalog's column type does
    (``_decoders``)."""

    def __init__(self, conn: Any, paramstyle: str, sqlite: bool) -> None:
        self.conn = conn
        self.percent = paramstyle == "pyformat"
        self.sqlite = sqlite

    def rows(self, sql: str, args: Sequence[Any]) -> list[tuple]:
        with closing(self.conn.cursor()) as cur:
            cur.execute(sql.replace("?", "%s") if self.percent else sql, list(args))
            return list(cur.fetchall())

    def views(self, view: type, table: str, where: tuple[str, list[Any]], order: str = "",
              limit: int | None = None, *, extra: str = "") -> list[Any]:
        """``SELECT`` the view's columns (and ``extra``'s: then (extra, view) pairs)."""
        names, decoders = _decoders(view)
        sql = f"SELECT {', '.join(([extra] if extra else []) + names)} FROM {table}"
        sql += f" WHERE {where[0]}" if where[0] else ""
        sql += f" ORDER BY {order}" if order else ""
        sql += " LIMIT ?" if limit is not None else ""
        found = []
        for row in self.rows(sql, [*where[1], *([limit] if limit is not None else [])]):
            values = row[1:] if extra else row
            made = view(**{n: d(v) if d and v is not None else v for n, d, v in zip(names, decoders, values,
                                                                                   strict=True)})
            found.append((row[0], made) if extra else made)
        return found

    def time(self, when: datetime) -> Any:
        """A time as the catalog stores it (``models.UtcDateTime``), for a comparison."""
        utc = when.astimezone(UTC)
        return utc.replace(tzinfo=None).isoformat(" ", "microseconds") if self.sqlite else utc


@functools.cache
def _decoders(view: type) -> tuple[list[str], list[Callable[[Any], Any] | None]]:
    """The view's columns (every field but ``artifacts``, which is a table of its own)
    and how each value is read, from the field's annotation: times are naive UTC text on
    SQLite and timestamptz on PostgreSQL (both become aware UTC datetimes), JSON is text
    on SQLite (psycopg2 decodes json itself), booleans are integers on SQLite."""
    names: list[str] = []
    decoders: list[Callable[[Any], Any] | None] = []
    for f in fields(view):
        if f.name == "artifacts":
            continue
        kind = str(f.type)
        names.append(f.name)
        decoders.append(_utc if "datetime" in kind else _json if kind.startswith(("dict", "list")) else
                        bool if kind == "bool" else None)
    return names, decoders


def _utc(value: datetime | str) -> datetime:
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@contextmanager
def _opened(url: str) -> Iterator[_Db | None]:
    """A connection to a catalog at the newest revision, or None (the caller then uses
    the full catalog)."""
    conn, paramstyle = _connect(url)
    if conn is None:
        yield None
        return
    try:
        db = _Db(conn, paramstyle, sqlite=url.startswith("sqlite"))
        try:
            current = db.rows("SELECT version_num FROM alembic_version", [])
        except Exception:  # noqa: BLE001 - no such table, or unreadable: the full catalog decides and says
            current = []
        yield db if [r[0] for r in current] == [newest_revision()] else None
    finally:
        conn.close()


# libpq settings for every connection to a PostgreSQL catalog (the reader's and the full
# catalog's), each unless the URL sets it: a server that stops answering fails the call
# instead of holding it (and the worker's lease renewals, the scheduler's tick, an
# operator's command) for ever. Without them, a server that accepted the connection and
# never answered held a command for as long as it was left; a host that vanished held a
# query until the kernel gave up retransmitting (about 15 minutes).
PG_CONNECT_SECONDS = 10  # the whole connection set-up, handshake and authentication
PG_UNACKED_SECONDS = 30  # sent data left unacknowledged (tcp_user_timeout, libpq 12+)
PG_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def pg_connect_args(given: Iterable[str], libpq_version: int) -> dict[str, Any]:
    """The libpq settings above that are not among ``given`` (the URL's own parameters)."""
    wanted: dict[str, Any] = {"connect_timeout": PG_CONNECT_SECONDS, **PG_KEEPALIVE}
    if libpq_version >= 120000:
        wanted["tcp_user_timeout"] = PG_UNACKED_SECONDS * 1000
    return {k: v for k, v in wanted.items() if k not in set(given)}


def _connect(url: str) -> tuple[Any, str]:
    if url.startswith("sqlite:///"):
        path = url.split("///", 1)[1]
        if not path or path == ":memory:" or path.startswith("file:") or "?" in path or not Path(path).is_file():
            return None, ""  # a new catalog is created (with its permissions) by the full one
        conn = sqlite3.connect(path, timeout=30)
        conn.execute("PRAGMA query_only=ON")  # these are reads: nothing here can change the catalog
        for suffix in ("-wal", "-shm", "-journal"):  # as the full catalog leaves them: private
            permissions.secure_catalog_file_if_mine(path + suffix)
        return conn, sqlite3.paramstyle
    if url.startswith(("postgresql+psycopg2://", "postgresql://")):
        try:
            import psycopg2
        except ImportError:
            return None, ""  # the full catalog says what to install
        try:  # libpq takes the URL itself, once the SQLAlchemy driver name is gone
            dsn = "postgresql://" + url.split("://", 1)[1]
            given = parse_qs(urlsplit(dsn).query)
            conn = psycopg2.connect(dsn, **pg_connect_args(given, psycopg2.extensions.libpq_version()))
            conn.set_session(readonly=True, autocommit=True)  # these are reads: nothing here can change the catalog
            return conn, psycopg2.paramstyle
        except psycopg2.OperationalError as e:  # said now: the full catalog would wait for it once more
            reason = str(e).strip()
            raise DatabaseUnavailable(mask(f"catalog {url} unreachable or not upgradable: {reason}")) from None
        except psycopg2.Error:
            return None, ""  # a parameter libpq does not know (one of SQLAlchemy's): the full catalog decides
    return None, ""

"""The catalog's listings for commands that must answer at once (``virtwarden jobs``,
``job ID``, ``backups``, ``alerts``): plain SQL through the DB-API driver the catalog URL names
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
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from virtwarden.catalog.views import AlertView, ArtifactView, JobView, PointView

from virtwarden import permissions
from virtwarden.errors import JobNotFound

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
            from virtwarden.catalog.store import Catalog

            return jobs.recent(Catalog(url), limit=limit, domain=domain)
        where, args = ("WHERE domain = ?", [domain]) if domain else ("", [])
        rows = db.rows(f"SELECT {_columns(JobView)} FROM jobs {where} ORDER BY created_at DESC LIMIT ?",
                       [*args, limit])
        return [JobView(**db.decode(r, JSON_JOB, TIMES_JOB)) for r in rows]


def job(url: str, job_id: str) -> JobView:
    """``catalog.jobs.get``: one job; JobNotFound when there is none of that id."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import jobs
            from virtwarden.catalog.store import Catalog

            return jobs.get(Catalog(url), job_id)
        rows = db.rows(f"SELECT {_columns(JobView)} FROM jobs WHERE id = ?", [job_id])
        if not rows:
            raise JobNotFound(f"no job {job_id!r}")
        return JobView(**db.decode(rows[0], JSON_JOB, TIMES_JOB))


def domain_points(url: str, domain: str) -> list[PointView]:
    """``catalog.points.for_domain``: a domain's points (by name), oldest first."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import points
            from virtwarden.catalog.store import Catalog

            return points.for_domain(Catalog(url), domain)
        rows = db.rows(f"SELECT {_columns(PointView, skip='artifacts')} FROM restore_points WHERE domain = ?"
                       " ORDER BY created_at, seq", [domain])
        arts: dict[str, list[ArtifactView]] = {}
        for a in db.rows(f"SELECT point_id, {_columns(ArtifactView)} FROM artifacts WHERE point_id IN"
                         " (SELECT id FROM restore_points WHERE domain = ?) ORDER BY target", [domain]):
            arts.setdefault(a.pop("point_id"), []).append(ArtifactView(**a))
        return [PointView(**db.decode(r, (), TIMES_POINT), artifacts=tuple(arts.get(r["id"], ())))
                for r in rows]


def recent_alerts(url: str, *, limit: int = 100, host: str | None = None) -> list[AlertView]:
    """``catalog.alerts.recent``: the last ``limit`` occurrences received (of ``host``),
    oldest first."""
    with _opened(url) as db:
        if db is None:
            from virtwarden.catalog import alerts
            from virtwarden.catalog.store import Catalog

            return alerts.recent(Catalog(url), limit=limit, host=host)
        where, args = ("WHERE host = ?", [host]) if host is not None else ("", [])
        rows = db.rows(f"SELECT {_columns(AlertView)} FROM alerts {where} ORDER BY id DESC LIMIT ?", [*args, limit])
        return [AlertView(**db.decode(r, ("labels",), TIMES_ALERT)) for r in reversed(rows)]


JSON_JOB = ("params", "result")
TIMES_JOB = ("created_at", "started_at", "finished_at")
TIMES_POINT = ("created_at", "completed_at", "verified_at")
TIMES_ALERT = ("starts_at", "received_at", "resolved_at")


def _columns(view: type, skip: str = "") -> str:
    """The view's fields, which are its table's column names."""
    return ", ".join(f for f in view.__dataclass_fields__ if f != skip)  # type: ignore[attr-defined]


class _Db:
    """One DB-API connection: ``?`` placeholders, rows as dicts, values decoded as the
    catalog's column types do (JSON text on SQLite; UTC-aware times on both)."""

    def __init__(self, conn: Any, paramstyle: str) -> None:
        self.conn = conn
        self.percent = paramstyle == "pyformat"

    def rows(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        with closing(self.conn.cursor()) as cur:
            cur.execute(sql.replace("?", "%s") if self.percent else sql, list(args))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    @staticmethod
    def decode(row: dict[str, Any], json_columns: Sequence[str], time_columns: Sequence[str]) -> dict[str, Any]:
        for k in json_columns:
            if isinstance(row[k], str):  # SQLite's JSON is text; psycopg2 decodes json itself
                row[k] = json.loads(row[k])
        for k in time_columns:
            row[k] = _utc(row[k])
        return row


def _utc(value: datetime | str | None) -> datetime | None:
    """A stored time as an aware UTC datetime (``models.UtcDateTime``): naive UTC text
    with six fractional digits on SQLite, timestamptz on PostgreSQL."""
    if value is None:
        return None
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@contextmanager
def _opened(url: str) -> Iterator[_Db | None]:
    """A connection to a catalog at the newest revision, or None (the caller then uses
    the full catalog)."""
    conn, paramstyle = _connect(url)
    if conn is None:
        yield None
        return
    try:
        db = _Db(conn, paramstyle)
        try:
            current = db.rows("SELECT version_num FROM alembic_version", [])
        except Exception:  # noqa: BLE001 - no such table, or unreadable: the full catalog decides and says
            current = []
        yield db if [r["version_num"] for r in current] == [newest_revision()] else None
    finally:
        conn.close()


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
            conn = psycopg2.connect("postgresql://" + url.split("://", 1)[1])
            conn.set_session(readonly=True, autocommit=True)  # these are reads: nothing here can change the catalog
            return conn, psycopg2.paramstyle
        except psycopg2.Error:
            return None, ""  # unreachable, or a parameter libpq does not know: the full catalog says
    return None, ""

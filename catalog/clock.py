"""The database's clock, as SQL expressions.

Leases, their expiry and the order of restore points are judged by one clock: the
catalog database's, read inside the statement that decides (``clock_timestamp()`` on
PostgreSQL). A worker whose host clock runs ahead or behind therefore neither takes over
a job renewed a moment ago nor makes its newest restore point look older than the last
one. SQLite is one machine's catalog: its "database clock" is that machine's clock, read
by the SQLite library in whichever process runs the statement.

Values are stored like every ``UtcDateTime``: timezone-aware on PostgreSQL, UTC text with
six fractional digits on SQLite (what SQLAlchemy writes), so they compare correctly with
values written from Python.
"""
from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from virtwarden.catalog.models import UtcDateTime

if TYPE_CHECKING:
    from virtwarden.catalog.store import Catalog

_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now'{})"


class db_now(FunctionElement):  # reads like the SQL function it stands for
    """The database's current time (UTC)."""

    type = UtcDateTime()
    inherit_cache = True
    name = "db_now"


class db_later(FunctionElement):
    """The database's current time plus ``seconds`` (negative: earlier)."""

    type = UtcDateTime()
    inherit_cache = True
    name = "db_later"

    def __init__(self, seconds: float) -> None:
        super().__init__(literal(float(seconds)))


@compiles(db_now)
def _now_default(_element: db_now, _compiler: Any, **_kw: Any) -> str:
    return "clock_timestamp()"


@compiles(db_now, "sqlite")
def _now_sqlite(_element: db_now, _compiler: Any, **_kw: Any) -> str:
    return _SQLITE_NOW.format("")


@compiles(db_later)
def _later_default(element: db_later, compiler: Any, **kw: Any) -> str:
    (seconds,) = list(element.clauses)
    return f"(clock_timestamp() + make_interval(secs => {compiler.process(seconds, **kw)}))"


@compiles(db_later, "sqlite")
def _later_sqlite(element: db_later, compiler: Any, **kw: Any) -> str:
    (seconds,) = list(element.clauses)
    return _SQLITE_NOW.format(f", ({compiler.process(seconds, **kw)} || ' seconds')")


def database_now(cat: Catalog) -> datetime:
    """The database's time now: what decisions about catalog times (retention periods,
    points "from the future", the age of leftovers) compare with."""
    with cat.session() as s:
        return s.execute(select(db_now())).scalar_one()

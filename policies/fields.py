"""The value types of a policy: durations, cron schedules, time zones and choices.

Each parser turns what an operator writes into a checked value, or raises ValueError
with a message that names the bad value and shows a good one: these messages end up
verbatim after ``file:line: field:`` in ``virtwarden policy validate``.
"""
from __future__ import annotations

import functools
import re
import typing
import zoneinfo
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from croniter import CroniterBadDateError, croniter
from pydantic import AfterValidator, BeforeValidator, Field, Strict

from virtwarden.validation import suggest

# Cron nicknames every cron user knows; @reboot is left out (it names no time).
CRON_NICKNAMES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
CRON_FIELDS = "minute hour day-of-month month day-of-week"
_CRON_RANGES = (("minute", "0-59"), ("hour", "0-23"), ("day-of-month", "1-31"), ("month", "1-12 or jan-dec"),
                ("day-of-week", "0-7 or sun-sat"))

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# Units in falling order, each at most once: '2d', '1h30m', '90s'.
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_DURATION_HELP = "e.g. '90s', '15m', '4h', '2d' or '1h30m' (units s, m, h, d)"

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")


def parse_duration(value: object) -> int:
    """Seconds in a duration such as '90s', '15m', '4h', '2d' or '1h30m'.

    A bare number is refused rather than guessed at: '4' could mean hours to one
    operator and seconds to the next.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"a duration must be text with a unit, {_DURATION_HELP} (got {value!r})")
    if isinstance(value, int):
        raise ValueError(f"the duration {value} needs a unit, {_DURATION_HELP}")
    text = value.strip()
    if text.isdigit():
        raise ValueError(f"the duration {value!r} needs a unit, {_DURATION_HELP}")
    match = _DURATION.fullmatch(text)
    if not text or not match:
        raise ValueError(f"invalid duration {value!r}: write a number and a unit, {_DURATION_HELP}")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in zip(match.groups(), "dhms", strict=True) if n)
    if seconds <= 0:
        raise ValueError(f"the duration {value!r} must be longer than zero")
    return seconds


def format_duration(seconds: int) -> str:
    """The shortest spelling of ``seconds`` that parse_duration reads back: 5400 -> '1h30m'."""
    out = ""
    for unit, size in _UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        out += f"{count}{unit}" if count else ""
    return out or "0s"


def check_cron(expr: str) -> str:
    """A 5-field cron expression (or a nickname such as '@daily'), as crontab(5) reads it.

    croniter also takes 6 and 7 fields (seconds, years); those are refused so that a
    schedule means what it would mean in a crontab.
    """
    expr = " ".join(expr.split())
    if expr.startswith("@"):
        if expr not in CRON_NICKNAMES:
            raise ValueError(f"unknown cron nickname {expr!r}{suggest(expr, CRON_NICKNAMES)}:"
                             f" use one of {', '.join(CRON_NICKNAMES)}")
        return expr
    fields = len(expr.split())
    if fields != 5:
        raise ValueError(f"cron expression {expr!r} has {fields} field{'s' if fields != 1 else ''};"
                         f" expected 5 ({CRON_FIELDS})")
    if not croniter.is_valid(expr):
        raise ValueError(f"invalid cron expression {expr!r}: {_cron_reason(expr)}")
    try:
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"cron expression {expr!r} never fires (no such date)") from None
    return expr


def _cron_reason(expr: str) -> str:
    """Which field is wrong, found by trying each one alone with the others set to '*'."""
    parts = expr.split()
    for i, (name, allowed) in enumerate(_CRON_RANGES):
        probe = ["*"] * 5
        probe[i] = parts[i]
        if not croniter.is_valid(" ".join(probe)):
            return f"the {name} field {parts[i]!r} is not valid ({name} takes {allowed})"
    return "the fields do not form a valid schedule"


def check_timezone(name: str) -> str:
    """An IANA time zone name ('Europe/Paris'); schedules are read in it, DST included."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        known = _zones()
        if not known:
            raise ValueError(f"unknown time zone {name!r} (this machine has no time zone"
                             " database: install the tzdata package)") from None
        exact = known.get(name.lower())
        hint = f" (did you mean {exact!r}?)" if exact else suggest(name, known.values())
        raise ValueError(f"unknown time zone {name!r}{hint}: use an IANA name such as"
                         " 'UTC' or 'Europe/Paris'") from None
    return name


@functools.lru_cache(maxsize=1)
def _zones() -> dict[str, str]:
    return {z.lower(): z for z in zoneinfo.available_timezones()}


def check_name(name: str) -> str:
    """A policy name: a DNS label, so it can name files, metrics labels and URLs unchanged."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid name {name!r}: use lowercase letters, digits and '-',"
                         " starting and ending with a letter or digit, at most 63 characters")
    return name


def check_xml_names(mapping: dict[str, str]) -> dict[str, str]:
    """Keys of the domain's virtwarden metadata: each is an XML element name there.

    Checked on the whole mapping so the message points at the field, not at pydantic's
    internal '[key]' location.
    """
    for key in mapping:
        if not _XML_NAME.fullmatch(key):
            raise ValueError(f"invalid metadata key {key!r}: it must be an XML element name"
                             " (letters, digits, '_', '-', '.'; not starting with a digit)")
    return mapping


def label_value(value: object) -> object:
    """Label and metadata values are text; an integer is taken as its digits.

    YAML reads unquoted yes/no/on/off/true/false as booleans and 1.10 as 1.1, so those
    are refused with a hint to quote them rather than silently turned into other text.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (bool, float)) or value is None:
        raise ValueError(f"must be text; quote it (YAML read it as {value!r})")
    return value


def choice(options: Any) -> BeforeValidator:
    """A validator for a ``Literal[...]`` field whose message lists the options and a near miss."""
    allowed = typing.get_args(options)

    def check(value: object) -> object:
        if value in allowed and isinstance(value, str):
            return value
        listed = ", ".join(repr(a) for a in allowed)
        if isinstance(value, bool):
            raise ValueError(f"must be one of {listed} (YAML read {value!r} as a boolean: quote it)")
        hint = suggest(value, allowed) if isinstance(value, str) else ""
        raise ValueError(f"{value!r} is not one of {listed}{hint}")

    return BeforeValidator(check)


def non_empty(what: str) -> Callable[[tuple[str, ...] | None], tuple[str, ...] | None]:
    """Refuse an empty list where leaving the key out is the way to say 'any'."""

    def check(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError(f"an empty list selects nothing: {what}")
        return value

    return check


Duration = Annotated[int, BeforeValidator(parse_duration)]
Cron = Annotated[str, Strict(), AfterValidator(check_cron)]
TimeZone = Annotated[str, Strict(), AfterValidator(check_timezone)]
Name = Annotated[str, Strict(), AfterValidator(check_name)]
Glob = Annotated[str, Strict(), Field(min_length=1)]
LabelValue = Annotated[str, BeforeValidator(label_value)]
DomainMetadata = Annotated[dict[str, LabelValue], AfterValidator(check_xml_names)]
Count = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[int, Strict(), Field(ge=1)]
Percent = Annotated[int, Strict(), Field(ge=1, le=100)]

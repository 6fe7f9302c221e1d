"""What each API token may do: scopes, and the scope each endpoint needs.

A token's line in ``api.token_file`` lists its scopes (virtwarden/api/auth.py reads it):

- ``alerts``: ``POST /v1/alerts`` (Alertmanager's webhook);
- ``read``: ``GET /v1/jobs/{id}``, ``GET /v1/domains/{name}/restore-points`` and
  ``/metrics`` (unless ``api.metrics_require_token`` is false);
- ``restore``: ``POST /v1/restores`` with ``to_dir`` (flat images in a directory);
- ``restore-domain``: ``POST /v1/restores`` with ``as_domain`` (and its ``start``);
- ``restore-in-place``: ``POST /v1/restores`` with ``in_place`` (and its
  ``discard_old`` and ``start``): it replaces a production domain's disks;
- ``drill`` and ``runbook``: for the drill and runbook endpoints (none is served yet;
  the names are reserved so token files can say them);
- ``admin``: every scope, now and to come. $VIRTWARDEN_API_TOKEN has it.

No scope implies another: a script that starts restores and follows them needs
``read,restore``. A request whose token lacks the scope is refused with 403 before the
request is looked at any further, so it starts nothing and learns nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import Request

from virtwarden.errors import VirtwardenError

ALERTS, READ, ADMIN = "alerts", "read", "admin"
RESTORE, RESTORE_DOMAIN, RESTORE_IN_PLACE = "restore", "restore-domain", "restore-in-place"
DRILL, RUNBOOK = "drill", "runbook"
SCOPES = (ALERTS, READ, RESTORE, RESTORE_DOMAIN, RESTORE_IN_PLACE, DRILL, RUNBOOK, ADMIN)
ANY_RESTORE = (RESTORE, RESTORE_DOMAIN, RESTORE_IN_PLACE)
EVERY_SCOPE = frozenset({ADMIN})


class ScopeMissing(VirtwardenError):
    """An authenticated caller whose token lacks the scope an endpoint needs (403)."""

    def __init__(self, caller: str, needed: tuple[str, ...], endpoint: str, what: str, has: Iterable[str]) -> None:
        wanted = " or ".join(repr(s) for s in needed)
        held = ", ".join(sorted(has)) or "none"
        super().__init__(f"token {caller!r} may not {what}: {endpoint} needs scope {wanted} "
                         f"(the token has: {held})")
        self.missing_scope, self.endpoint = needed[0] if len(needed) == 1 else " or ".join(needed), endpoint


def allows(scopes: frozenset[str], needed: Iterable[str]) -> bool:
    return ADMIN in scopes or any(s in scopes for s in needed)


def endpoint_of(request: Request) -> str:
    """``POST /v1/restores``, ``GET /v1/jobs/{job_id}``: the route's template, not the path."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', request.url.path)}"


def require(request: Request, needed: tuple[str, ...], what: str) -> None:
    """Raise ScopeMissing unless the caller's token holds one of ``needed`` (or admin)."""
    scopes: frozenset[str] = getattr(request.state, "scopes", frozenset())
    if not allows(scopes, needed):
        raise ScopeMissing(getattr(request.state, "caller", "?"), needed, endpoint_of(request), what, scopes)


def needs(*needed: str, what: str) -> Callable[[Request], None]:
    """A route dependency: the endpoint needs one of ``needed``."""

    def check(request: Request) -> None:
        require(request, needed, what)

    return check


def restore_scope(*, as_domain: bool, in_place: bool) -> tuple[str, str]:
    """(scope, what it allows) for a restore request; ``start`` and ``discard_old`` go
    with the mode's own scope."""
    if in_place:
        return RESTORE_IN_PLACE, "restore a domain in place"
    if as_domain:
        return RESTORE_DOMAIN, "restore as a new domain"
    return RESTORE, "restore to a directory"

"""The on-call dashboard served at ``/ui``: one HTML page, its script and its style,
packaged here (no CDN, no build step). The page holds no data: it asks for an API token,
keeps it in the tab's sessionStorage, and reads and acts through the /v1 endpoints with
it, so a token's scopes decide what the page may do (a read-only token sees everything
and starts nothing). Every action shows its dry-run plan and asks before it starts.
"""
from __future__ import annotations

from functools import cache
from importlib import resources

# Nothing but our own files: no inline script or style, no other origin, no framing.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


@cache
def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def page() -> str:
    return _read("index.html")


def asset(name: str) -> tuple[str, str]:
    """(content, media type) of one of ``ASSETS``; KeyError for anything else."""
    return _read(name), ASSETS[name]

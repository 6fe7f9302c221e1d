"""Who may call the HTTP API, and how much: bearer tokens with scopes, optional signed
request bodies, body size caps and per-token rate limits.

Tokens come from ``api.token_file``, one a line (blank lines and ``#`` comments are
skipped)::

    NAME:SCOPE,SCOPE:TOKEN [rate=R] [burst=B]
    NAME:TOKEN
    TOKEN

NAME names the caller in the audit log (``token-<line>`` when left out); SCOPEs are
those of virtwarden/api/scopes.py; ``rate`` (requests a second) and ``burst`` override
``api.rate_per_second`` and ``api.rate_burst`` for this token. A line without scopes,
as every line was before scopes existed, keeps the meaning it had: every scope. That
is logged as a warning each time the file is read, so such files keep working after an
upgrade while the operator is told to narrow them. $VIRTWARDEN_API_TOKEN (caller
``env``) has every scope. The file is read again when it changes, so a token is added,
narrowed or revoked without a restart; a file that became unreadable or invalid admits
nobody until fixed. A presented token is compared with every known one in constant time.

With ``api.hmac_key_file``, a POST to a signed endpoint must also carry
``X-Virtwarden-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<raw body>")>``.
A timestamp further than ``signature_tolerance_seconds`` from the server's clock is
refused, and so is a signature seen before (kept in the catalog for that long, so every
API process agrees). Because the signature covers the timestamp and the body, a retry
must be signed afresh; the same body signed in the same second is a replay.

All of this runs in an ASGI middleware, before the body is parsed, in this order: the
token (401), the token's rate limit (429 with Retry-After), the body's size (413, from
Content-Length before anything is read, else while reading), the signature (401). A
request refused here writes nothing to the catalog: it is counted in
``virtwarden_api_refused_requests_total{reason}`` and logged, at most once a minute per
reason, so a flood of bad requests can neither grow the catalog nor the log.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from virtwarden import permissions
from virtwarden.api.limits import LogThrottle, RateLimiter
from virtwarden.api.scopes import EVERY_SCOPE, SCOPES
from virtwarden.catalog import api as api_catalog
from virtwarden.catalog.store import Catalog
from virtwarden.config import ApiConfig
from virtwarden.errors import ConfigError, VirtwardenError
from virtwarden.validation import suggest

log = logging.getLogger(__name__)
MIN_TOKEN_LENGTH = 16
SIGNATURE_HEADER = "x-virtwarden-signature"
ANONYMOUS = "anonymous"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_SCOPE_LIST = re.compile(r"^\s*[a-z][a-z-]*\s*(,\s*[a-z][a-z-]*\s*)*$")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Refused(Exception):
    """A request refused before it reaches the application; ``kind`` labels the
    refusal in the metric, ``caller`` is set once the token was good."""

    def __init__(self, reason: str, kind: str, caller: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.caller = reason, kind, caller


# --- tokens ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    """A token's holder as its line in the token file describes it."""

    name: str
    scopes: frozenset[str]
    rate: float | None = None  # None: api.rate_per_second
    burst: int | None = None  # None: api.rate_burst
    scoped: bool = True  # False: the line named no scopes (every scope, as before scopes)


@dataclass(frozen=True)
class TokenLine:
    caller: Caller
    token: str
    line: int


def parse_tokens(text: str, source: str) -> list[TokenLine]:
    """The tokens of a token file; ConfigError naming the line at fault."""
    found: list[TokenLine] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry = _parse_line(line, f"{source}:{n}", n)
        if any(entry.caller.name == other.caller.name for other in found):
            raise ConfigError(f"{source}:{n}: caller name {entry.caller.name!r} used twice")
        found.append(entry)
    return found


def _parse_line(line: str, where: str, n: int) -> TokenLine:
    name, sep, rest = line.partition(":")
    name = name.strip()
    if not sep or not _NAME.match(name):
        name, rest = f"token-{n}", line
    scopes, scoped = EVERY_SCOPE, False
    head, sep, tail = rest.partition(":")
    if sep and not head.strip():
        raise ConfigError(f"{where}: empty scope list (write NAME:SCOPE,SCOPE:TOKEN)")
    if sep and _SCOPE_LIST.match(head):
        scopes, scoped, rest = _scopes(head, where), True, tail
    token, *options = rest.split() or [""]
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{where}: token shorter than {MIN_TOKEN_LENGTH} characters")
    rate, burst = _options(options, where)
    return TokenLine(Caller(name, scopes, rate, burst, scoped), token, n)


def _scopes(text: str, where: str) -> frozenset[str]:
    scopes = [s.strip() for s in text.split(",")]
    for s in scopes:
        if s not in SCOPES:
            raise ConfigError(f"{where}: unknown scope {s!r}{suggest(s, SCOPES)} (scopes: {', '.join(SCOPES)}; "
                              "a token itself cannot contain ':')")
    return frozenset(scopes)


def _options(options: list[str], where: str) -> tuple[float | None, int | None]:
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("rate", "burst"):
            raise ConfigError(f"{where}: {option!r} is not rate=REQUESTS_PER_SECOND or burst=REQUESTS")
        values[key] = value
    try:
        rate = float(values["rate"]) if "rate" in values else None
        burst = int(values["burst"]) if "burst" in values else None
    except ValueError:
        raise ConfigError(f"{where}: rate must be a number and burst a whole number") from None
    if (rate is not None and not rate > 0) or (burst is not None and burst < 1):
        raise ConfigError(f"{where}: rate must be above 0 and burst at least 1")
    return rate, burst


class Tokens:
    """The bearer tokens the API accepts right now, and who holds each."""

    def __init__(self, path: str | None, env_token: str | None = None) -> None:
        self.path = Path(path) if path else None
        if env_token is not None and len(env_token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"VIRTWARDEN_API_TOKEN is shorter than {MIN_TOKEN_LENGTH} characters")
        self._env = [(_digest(env_token), Caller("env", EVERY_SCOPE))] if env_token else []
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._known: list[tuple[bytes, Caller]] = []
        if self.path:
            self._load(strict=True)
        if not self._all():
            where = f"{self.path} holds none" if self.path else "api.token_file is not set"
            raise ConfigError(f"the API needs at least one bearer token ({where}): put one per line "
                              f"(NAME:SCOPE,...:TOKEN) in api.token_file, or set VIRTWARDEN_API_TOKEN")

    def identify(self, presented: str) -> Caller | None:
        """The holder of ``presented`` when it is a known token (constant time)."""
        if self.path:
            self._load(strict=False)
        digest = _digest(presented)
        match = None
        for known, who in self._all():
            if hmac.compare_digest(digest, known):
                match = who
        return match

    def _all(self) -> list[tuple[bytes, Caller]]:
        return self._known + self._env

    def _load(self, *, strict: bool) -> None:
        assert self.path is not None
        stamp = None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with self._lock:
                lines = parse_tokens(self.path.read_text(), str(self.path))
                # Warned, not refused: the same rule as the configuration file's
                # (virtwarden.permissions.exposure: the service group may read it).
                permissions.warn_if_exposed(self.path, "API tokens")
                for entry in lines:
                    if not entry.caller.scoped:
                        log.warning("%s:%d: token %r names no scopes, so it may do everything (admin); "
                                    "give it only what it needs, e.g. %s:alerts:TOKEN", self.path, entry.line,
                                    entry.caller.name, entry.caller.name)
                self._known = [(_digest(e.token), e.caller) for e in lines]
                self._stamp = stamp
        except (OSError, ConfigError) as e:
            if strict:
                raise ConfigError(f"api.token_file: {e}") from None
            log.error("api.token_file unusable, refusing its tokens until it is fixed: %s", e)
            # Said once per version of the file; a missing file is looked for again each time.
            self._known, self._stamp = [], stamp if isinstance(e, ConfigError) else None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer(headers: dict[str, str]) -> str:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if not value:
        raise Refused("missing Authorization: Bearer token", "no-token")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused("Authorization must be 'Bearer <token>'", "not-bearer")
    return token.strip()


# --- signatures --------------------------------------------------------------------------
def sign(key: bytes, body: bytes, t: int) -> str:
    """The signature header's value for ``body`` sent at unix time ``t``."""
    mac = hmac.new(key, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def read_key(path: str) -> bytes:
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"api.hmac_key_file: cannot read {path}: {e.strerror}") from None
    permissions.warn_if_exposed(path, "the API's HMAC key")
    if len(key) < 32:
        raise ConfigError(f"api.hmac_key_file: {path} holds fewer than 32 bytes; use e.g. `openssl rand -hex 32`")
    return key


@dataclass(frozen=True)
class Signatures:
    key: bytes
    tolerance: int
    endpoints: tuple[str, ...]

    def required(self, method: str, path: str) -> bool:
        return method == "POST" and path.rstrip("/").removeprefix("/v1/") in self.endpoints

    def check(self, header: str, body: bytes, now: float) -> tuple[str, int]:
        """(signature, timestamp) when the header signs ``body`` within the window."""
        fields = dict(part.strip().partition("=")[::2] for part in header.split(","))
        t, mac = fields.get("t", ""), fields.get("v1", "").lower()
        if not t.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", mac):
            raise Refused("malformed signature header: want t=<unix seconds>,v1=<64 hex digits>", "bad-signature")
        skew = abs(now - int(t))
        if skew > self.tolerance:
            raise Refused(f"signature timestamp is {skew:.0f} s from the server's clock "
                          f"(tolerance {self.tolerance} s): sign each request when sending it", "bad-signature")
        expected = sign(self.key, body, int(t)).partition(",v1=")[2]
        if not hmac.compare_digest(expected, mac):
            raise Refused("signature does not match the body (wrong key, or the body changed on the way)",
                          "bad-signature")
        return mac, int(t)


# --- the middleware --------------------------------------------------------------------
class AuthMiddleware:
    """Admits /v1 (and /metrics when it needs a token) before the application sees the
    request; sets ``request.state.caller`` (the token's name), ``.scopes`` and ``.raw_body``.
    ``on_refused(reason)`` counts each refusal."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, cat: Catalog, tokens: Tokens,
                 signatures: Signatures | None, settings: ApiConfig, on_refused: Callable[[str], None]) -> None:
        self.app, self.cat, self.tokens, self.signatures = app, cat, tokens, signatures
        self.settings, self.on_refused = settings, on_refused
        self.limiter = RateLimiter()
        self.throttle = LogThrottle(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            who = self._identify(headers)
            self._check_rate(who)
            body = await _read_body(receive, headers, self.settings.max_body_bytes, who.name)
            if self.signatures is not None:
                await run_in_threadpool(self._check_signature, scope, headers, body, who.name)
        except Refused as e:
            await self._refuse(scope, send, e)
            return
        except VirtwardenError as e:  # the catalog, asked about a signature, is down
            await _reply(send, 503, str(e))
            return
        state = scope.setdefault("state", {})
        state.update(caller=who.name, scopes=who.scopes, raw_body=body)
        await self.app(scope, _replay(body, receive), send)

    def _protected(self, path: str) -> bool:
        return (path == "/v1" or path.startswith("/v1/")
                or (self.settings.metrics_require_token and path.rstrip("/") == "/metrics"))

    def _identify(self, headers: dict[str, str]) -> Caller:
        who = self.tokens.identify(bearer(headers))
        if who is None:
            raise Refused("invalid bearer token", "bad-token")
        return who

    def _check_rate(self, who: Caller) -> None:
        rate, burst = who.rate or self.settings.rate_per_second, who.burst or self.settings.rate_burst
        wait = self.limiter.retry_after(who.name, rate, burst)
        if wait:
            raise TooMany(f"too many requests from token {who.name!r} (at most {rate:g} a second, bursts of "
                          f"{burst}, per API process): retry in {wait} s", who.name, wait)

    def _check_signature(self, scope: Scope, headers: dict[str, str], body: bytes, caller: str) -> None:
        header = headers.get(SIGNATURE_HEADER)
        sig = self.signatures
        assert sig is not None
        if header is None and not sig.required(scope["method"], scope["path"]):
            return
        if header is None:
            raise Refused(f"missing X-Virtwarden-Signature header (required for {scope['method']} {scope['path']})",
                          "no-signature", caller)
        try:
            mac, t = sig.check(header, body, time.time())
        except Refused as e:
            raise Refused(e.reason, e.kind, caller) from None
        expires = datetime.fromtimestamp(t + sig.tolerance + 1, UTC)
        if not api_catalog.use_signature(self.cat, mac, expires):
            raise Refused("signature was used before (a replay): sign each request afresh", "replayed-signature",
                          caller)

    async def _refuse(self, scope: Scope, send: Send, e: Refused) -> None:
        self.on_refused(e.kind)
        self.throttle.warning(e.kind, "refused %s %s from %s (%s): %s", scope["method"], scope["path"],
                              _client(scope), e.caller or "no valid token", e.reason)
        if isinstance(e, TooMany):
            await _reply(send, 429, e.reason, {"retry-after": str(e.retry_after)})
        elif isinstance(e, TooLarge):
            await _reply(send, 413, e.reason, {"connection": "close"})
        else:
            await _reply(send, 401, e.reason, {"www-authenticate": 'Bearer realm="virtwarden"'})


class TooMany(Refused):
    def __init__(self, reason: str, caller: str, retry_after: int) -> None:
        super().__init__(reason, "rate-limited", caller)
        self.retry_after = retry_after


class TooLarge(Refused):
    def __init__(self, limit: int, caller: str) -> None:
        super().__init__(f"request body larger than {limit} bytes (api.max_body_bytes): not read",
                         "body-too-large", caller)


async def _read_body(receive: Receive, headers: dict[str, str], limit: int, caller: str) -> bytes:
    """The whole body; TooLarge as soon as it is known to exceed ``limit`` (from its
    Content-Length, before reading any of it, or while reading a chunked one)."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(limit, caller)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit, caller)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


async def _reply(send: Send, status: int, message: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def env_token() -> str | None:
    from virtwarden.config import ENV_API_TOKEN

    return os.environ.get(ENV_API_TOKEN) or None

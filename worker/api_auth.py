"""Who may call the HTTP API: bearer tokens and, optionally, signed request bodies.

Tokens come from ``api.token_file`` (one a line; ``NAME:TOKEN`` names the caller in the
audit log; blank lines and ``#`` comments are skipped) and from $VIRTWARDEN_API_TOKEN
(caller ``env``). The file is read again when it changes, so a token is added or revoked
without a restart; a file that became unreadable or invalid admits nobody until fixed.
A presented token is compared with every known one in constant time.

With ``api.hmac_key_file``, a POST to a signed endpoint must also carry
``X-Virtwarden-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<raw body>")>``.
A timestamp further than ``signature_tolerance_seconds`` from the server's clock is
refused, and so is a signature seen before (kept in the catalog for that long, so every
API process agrees). Because the signature covers the timestamp and the body, a retry
must be signed afresh; the same body signed in the same second is a replay.

All of this runs in an ASGI middleware, before the body is parsed: a request without
valid credentials gets 401 and nothing else happens, whatever its body holds.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from catalog import api as api_catalog
from catalog.store import Catalog
from virtwarden.errors import ConfigError, VirtwardenError

log = logging.getLogger(__name__)
MIN_TOKEN_LENGTH = 16
MAX_BODY_BYTES = 1 << 20  # Alertmanager groups and restore requests are far smaller
SIGNATURE_HEADER = "x-virtwarden-signature"
ANONYMOUS = "anonymous"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Refused(Exception):
    """A request without valid credentials; ``caller`` is set when the token was good."""

    def __init__(self, reason: str, caller: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.caller = reason, caller


# --- tokens ----------------------------------------------------------------------------
def parse_tokens(text: str, source: str) -> list[tuple[str, str]]:
    """(caller name, token) pairs of a token file; ConfigError naming the line at fault."""
    found: list[tuple[str, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name = name.strip()
        if not sep or not _NAME.match(name):
            name, token = f"token-{n}", line
        token = token.strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{source}:{n}: token shorter than {MIN_TOKEN_LENGTH} characters")
        if any(name == other for other, _ in found):
            raise ConfigError(f"{source}:{n}: caller name {name!r} used twice")
        found.append((name, token))
    return found


class Tokens:
    """The bearer tokens the API accepts right now."""

    def __init__(self, path: str | None, env_token: str | None = None) -> None:
        self.path = Path(path) if path else None
        if env_token is not None and len(env_token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"VIRTWARDEN_API_TOKEN is shorter than {MIN_TOKEN_LENGTH} characters")
        self._env = [("env", env_token)] if env_token else []
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._digests: list[tuple[str, bytes]] = []
        if self.path:
            self._load(strict=True)
        if not self._all():
            where = f"{self.path} holds none" if self.path else "api.token_file is not set"
            raise ConfigError(f"the API needs at least one bearer token ({where}): put one per line "
                              f"(NAME:TOKEN to name the caller) in api.token_file, or set "
                              f"VIRTWARDEN_API_TOKEN")

    def caller(self, presented: str) -> str | None:
        """The caller's name when ``presented`` is a known token (constant time)."""
        if self.path:
            self._load(strict=False)
        digest = hashlib.sha256(presented.encode()).digest()
        match = None
        for name, known in self._all():
            if hmac.compare_digest(digest, known):
                match = name
        return match

    def _all(self) -> list[tuple[str, bytes]]:
        return self._digests + [(n, hashlib.sha256(t.encode()).digest()) for n, t in self._env]

    def _load(self, *, strict: bool) -> None:
        assert self.path is not None
        stamp = None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with self._lock:
                pairs = parse_tokens(self.path.read_text(), str(self.path))
                if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                    log.warning("%s can be read by other users; chmod 600 it", self.path)
                self._digests = [(n, hashlib.sha256(t.encode()).digest()) for n, t in pairs]
                self._stamp = stamp
        except (OSError, ConfigError) as e:
            if strict:
                raise ConfigError(f"api.token_file: {e}") from None
            log.error("api.token_file unusable, refusing its tokens until it is fixed: %s", e)
            # Said once per version of the file; a missing file is looked for again each time.
            self._digests, self._stamp = [], stamp if isinstance(e, ConfigError) else None


def bearer(headers: dict[str, str]) -> str:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if not value:
        raise Refused("missing Authorization: Bearer token")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused("Authorization must be 'Bearer <token>'")
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
            raise Refused("malformed signature header: want t=<unix seconds>,v1=<64 hex digits>")
        skew = abs(now - int(t))
        if skew > self.tolerance:
            raise Refused(f"signature timestamp is {skew:.0f} s from the server's clock "
                          f"(tolerance {self.tolerance} s): sign each request when sending it")
        expected = sign(self.key, body, int(t)).partition(",v1=")[2]
        if not hmac.compare_digest(expected, mac):
            raise Refused("signature does not match the body (wrong key, or the body changed on the way)")
        return mac, int(t)


# --- the middleware --------------------------------------------------------------------
class AuthMiddleware:
    """Authenticates /v1 (and optionally /metrics) before the application sees the
    request; sets ``request.state.caller`` and ``request.state.raw_body``."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, cat: Catalog, tokens: Tokens,
                 signatures: Signatures | None, protect_metrics: bool,
                 on_refused: Callable[[Scope, str, str, int], None]) -> None:
        self.app, self.cat, self.tokens, self.signatures = app, cat, tokens, signatures
        self.protect_metrics, self.on_refused = protect_metrics, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        try:
            body = await _read_body(receive)
        except _TooLarge:
            why = f"request body larger than {MAX_BODY_BYTES} bytes"
            await run_in_threadpool(self.on_refused, scope, ANONYMOUS, why, 413)
            await _reply(send, 413, why)
            return
        state["raw_body"] = body
        try:
            state["caller"] = await run_in_threadpool(self._authenticate, scope, body)
        except Refused as e:
            log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], _client(scope), e.reason)
            await run_in_threadpool(self.on_refused, scope, e.caller or ANONYMOUS, e.reason, 401)
            await _reply(send, 401, e.reason, {"www-authenticate": 'Bearer realm="virtwarden"'})
            return
        except VirtwardenError as e:  # the catalog, asked about a signature, is down
            await _reply(send, 503, str(e))
            return
        await self.app(scope, _replay(body, receive), send)

    def _protected(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or (self.protect_metrics and path == "/metrics")

    def _authenticate(self, scope: Scope, body: bytes) -> str:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        caller = self.tokens.caller(bearer(headers))
        if caller is None:
            raise Refused("invalid bearer token")
        header = headers.get(SIGNATURE_HEADER)
        sig = self.signatures
        if sig is None or (header is None and not sig.required(scope["method"], scope["path"])):
            return caller
        if header is None:
            raise Refused(f"missing X-Virtwarden-Signature header (required for {scope['method']} {scope['path']})",
                          caller)
        try:
            mac, t = sig.check(header, body, time.time())
        except Refused as e:
            raise Refused(e.reason, caller) from None
        expires = datetime.fromtimestamp(t + sig.tolerance + 1, timezone.utc)
        if not api_catalog.use_signature(self.cat, mac, expires):
            raise Refused("signature was used before (a replay): sign each request afresh", caller)
        return caller


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _TooLarge()
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
    import json

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

"""A fault-injecting HTTP proxy for tests, in front of a real endpoint (the S3 server).

Clients (the test itself, or worker processes it starts) talk to ``proxy.url`` instead
of the endpoint. Requests pass through unchanged unless a rule matches them; a rule
either answers in the endpoint's place (``respond``: e.g. 503 Slow Down, the request
never reaches the endpoint), flips one byte of the request body on its way
(``corrupt``) or of the endpoint's answer (``corrupt-reply``: a body with a
Content-Length), or drops the connection halfway through the request's body, which
never reaches the endpoint (``cut``), or after the answer's head and the start of its
body (``cut-reply``): a network that fails mid-transfer. Each rule applies
to its first ``times`` matching requests. Every request is recorded with what was done
to it and the status the endpoint answered, so a test can tell who refused what.

HTTP/1.1 with keep-alive, request bodies with Content-Length (what botocore sends over
plain HTTP), ``Expect: 100-continue`` answered by the proxy itself, responses with
Content-Length, chunked or until close. asyncio in a daemon thread of the test process.

    with FaultProxy(endpoint) as proxy:
        proxy.add(Rule(upload_part, "respond", times=2, status=503, body=SLOW_DOWN))
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")
READ = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # lower-case names


@dataclass
class Rule:
    match: Callable[[Request], bool]
    action: str  # "respond" | "corrupt" | "corrupt-reply" | "cut" | "cut-reply"
    times: int = 1
    status: int = 503
    body: bytes = SLOW_DOWN
    offset: float = 0.5  # where in the body "corrupt" and "corrupt-reply" flip a byte, "cut" and "cut-reply" cut
    #                      (a fraction of its length)
    used: int = 0


@dataclass
class Seen:
    request: Request
    action: str  # "pass", "respond", "corrupt", "corrupt-reply", "cut" or "cut-reply"
    status: int = 0  # the endpoint's answer (0 when the proxy answered instead)
    reply: bytes = b""  # the start of the endpoint's answer body


def upload_part(r: Request) -> bool:
    """S3 UploadPart: PUT ...?partNumber=N&uploadId=..."""
    return r.method == "PUT" and "partNumber=" in r.target and "uploadId=" in r.target


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._lock = threading.Lock()
        # Requests read but not yet recorded: the client may have its answer a moment
        # before the proxy records it, so what tests read waits until none is left.
        self._settled = threading.Condition(self._lock)
        self._in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self.url = ""

    # --- for tests ----------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def handled(self, action: str) -> list[Seen]:
        return [s for s in self.recorded() if s.action == action]

    def requests(self, match: Callable[[Request], bool]) -> list[Seen]:
        return [s for s in self.recorded() if match(s.request)]

    def recorded(self, timeout: float = 10) -> list[Seen]:
        """Every request seen so far, once each one already answered is recorded."""
        with self._settled:
            if not self._settled.wait_for(lambda: self._in_flight == 0, timeout):
                raise AssertionError(f"the proxy still handles {self._in_flight} request(s) after {timeout} s")
            return list(self.seen)

    # --- the proxy ----------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            # Connections still open end here, on this loop (their writers closed), not
            # later when the garbage collector closes their coroutines on a dead loop.
            open_ones = asyncio.all_tasks(self._loop)
            for task in open_ones:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*open_ones, return_exceptions=True))
            self._loop.close()

    def _take(self, request: Request) -> tuple[str, Rule | None]:
        with self._lock:
            for rule in self.rules:
                if rule.used < rule.times and rule.match(request):
                    rule.used += 1
                    return rule.action, rule
        return "pass", None

    def _record(self, seen: Seen) -> None:
        with self._settled:
            self.seen.append(seen)
            self._done()

    def _begin(self) -> None:
        with self._settled:
            self._in_flight += 1

    def _done(self) -> None:
        """Called with the lock held."""
        self._in_flight -= 1
        self._settled.notify_all()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        pending = False
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request, lines = _parse_request(head)
                self._begin()
                pending = True
                action, rule = self._take(request)
                length = int(request.headers.get("content-length", "0"))
                expects = request.headers.get("expect", "").lower() == "100-continue"
                if action == "respond" and rule:
                    if not expects:  # the client sends its body anyway: take it off the line
                        await reader.readexactly(length)
                    writer.write(_response(rule.status, rule.body))
                    await writer.drain()
                    pending = False
                    self._record(Seen(request, action))
                    return  # "Connection: close", as S3 does after an error
                if expects:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                if action == "cut" and rule:
                    await reader.readexactly(int(length * rule.offset))
                    pending = False
                    self._record(Seen(request, action))
                    return  # dropped with half the body read; the endpoint saw nothing
                body = await reader.readexactly(length)
                if action == "corrupt" and rule and body:
                    at = min(len(body) - 1, int(len(body) * rule.offset))
                    body = body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1:]
                if upstream is None:
                    upstream = await asyncio.open_connection(self._host, self._port)
                forwarded = [ln for ln in lines if not ln.lower().startswith(b"expect:")]
                upstream[1].write(b"\r\n".join(forwarded) + b"\r\n\r\n" + body)
                await upstream[1].drain()
                flip = rule.offset if action == "corrupt-reply" and rule else None
                cut = rule.offset if action == "cut-reply" and rule else None
                try:
                    status, reply, keep = await _relay(upstream[0], writer, request.method, flip, cut)
                except _Cut as c:
                    pending = False
                    self._record(Seen(request, action, c.status, c.reply))
                    return  # both connections closed, mid-body
                pending = False
                self._record(Seen(request, action, status, reply))
                if not keep:
                    return
        finally:
            if pending:  # the connection broke before the request was recorded
                with self._settled:
                    self._done()
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()


def _parse_request(head: bytes) -> tuple[Request, list[bytes]]:
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        raise NotImplementedError("chunked request bodies are not supported by this proxy")
    return Request(method, target, headers), lines


def _response(status: int, body: bytes) -> bytes:
    reason = {400: "Bad Request", 500: "Internal Server Error", 503: "Slow Down"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _Cut(Exception):
    """Not an error: the proxy dropped the connection as its rule said."""

    def __init__(self, status: int, reply: bytes) -> None:
        super().__init__("cut")
        self.status, self.reply = status, reply


async def _relay(up: asyncio.StreamReader, down: asyncio.StreamWriter, method: str,
                 flip: float | None = None, cut: float | None = None) -> tuple[int, bytes, bool]:
    """Copy one response; returns its status, the start of its body, and whether the
    connection may carry another request. ``flip``: flip one byte of a body with a
    Content-Length, at that fraction of its length. ``cut``: pass the body with a
    Content-Length only up to that fraction of it, then raise _Cut (the caller drops
    both connections)."""
    head = await up.readuntil(b"\r\n\r\n")
    down.write(head)
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = headers.get("connection", "").lower() != "close"
    first = bytearray()
    at = -1  # the body's byte to flip, counted down as the body passes

    async def copy(n: int) -> None:
        nonlocal at
        while n > 0:
            chunk = await up.read(min(n, READ))
            if not chunk:
                raise ConnectionError("endpoint closed mid-response")
            if 0 <= at < len(chunk):
                chunk = chunk[:at] + bytes([chunk[at] ^ 0x01]) + chunk[at + 1:]
            at -= len(chunk)
            if len(first) < 4096:
                first.extend(chunk[:4096])
            down.write(chunk)
            await down.drain()
            n -= len(chunk)

    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        pass
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if flip is not None and length:
            at = min(length - 1, int(length * flip))
        if cut is not None and length:
            await copy(int(length * cut))
            await down.drain()
            raise _Cut(status, bytes(first))
        await copy(length)
    elif "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size_line = await up.readuntil(b"\r\n")
            down.write(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                trailer = await up.readuntil(b"\r\n")
                while trailer != b"\r\n":
                    down.write(trailer)
                    trailer = await up.readuntil(b"\r\n")
                down.write(trailer)
                break
            await copy(size + 2)
    else:
        while chunk := await up.read(READ):
            down.write(chunk)
        keep = False
    await down.drain()
    return status, bytes(first), keep


# --- pytest fixture (tests/conftest.py lists this module as a plugin) -------------------
@pytest.fixture
def s3_fault_proxy(s3_endpoint: str):
    """A FaultProxy in front of the test S3 endpoint, without rules until a test adds some."""
    with FaultProxy(s3_endpoint) as proxy:
        yield proxy

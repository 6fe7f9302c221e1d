"""Reading a shut-off domain's disk in place: ``qemu-nbd`` exports the image read-only
(any format, backing chain included) and an NBD client reads it, so a format-2 backup
of a shut-off domain needs no copy of the disk in scratch space.

``ImageExport`` runs ``qemu-nbd --read-only`` on one image for as long as its block
runs. qemu-nbd holds the image as ``qemu-img convert`` does: a QEMU that starts the
domain meanwhile cannot get its write lock and fails to start, so the disk cannot change
under the backup. Its socket lives in a directory the caller gives (the job's scratch),
bound and reached through ``/proc/self/fd/N/`` of a descriptor of that directory, so a
long path does not matter.

``NbdClient`` speaks the protocol's read side (virtwarden/nbd_protocol.py): the
fixed-newstyle handshake with structured replies, ``NBD_CMD_READ`` and
``NBD_CMD_BLOCK_STATUS`` on ``base:allocation``. One request at a time per connection;
``ImageExport.read`` gives each thread a connection of its own (qemu-nbd ``--shared``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from virtwarden import nbd_protocol as P
from virtwarden.errors import HypervisorError, ToolFailed

QEMU_NBD = "qemu-nbd"
CONNECTIONS = 8  # qemu-nbd --shared: the readers' threads, with room
START_SECONDS = 30.0
# The longest the server may stay silent: in the handshake, or answering one request (at
# most a chunk). Longer, it is wedged (a hung QEMU), and the read fails instead of holding
# the job, and the guest's backup job with it, for ever.
IO_SECONDS = 300.0


class NbdError(HypervisorError):
    """The export refused a request or broke the protocol."""


class NbdClient:
    """One connection to an NBD export: ``size``, ``read``, ``extents``."""

    def __init__(self, path: str, export: str = "", contexts: tuple[bytes, ...] = (P.BASE_ALLOCATION,)) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_SECONDS)
        self.contexts: dict[bytes, int] = {}  # metadata context -> the id the server gave it
        try:
            self.sock.connect(path)
            self._handshake(export.encode(), contexts)
        except TimeoutError:
            self.sock.close()
            raise NbdError(f"the NBD export at {path} did not answer within {IO_SECONDS:g}s") from None
        except BaseException:
            self.sock.close()
            raise
        self._cookie = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0))
        self.sock.close()

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        """Exactly ``len(view)`` bytes received into ``view``."""
        got, n = 0, len(view)
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                raise NbdError(f"the NBD export did not answer within {IO_SECONDS:g}s") from None
            except OSError as e:
                raise NbdError(f"the NBD export closed the connection ({e.strerror})") from e
            if not k:
                raise NbdError("the NBD export closed the connection")
            got += k

    # --- handshake --------------------------------------------------------------------
    def _option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the final one (ACK or an error)."""
        self.sock.sendall(struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self._recv(20))
            if magic != P.OPT_REPLY_MAGIC or opt != option:
                raise NbdError(f"bad option reply (magic {magic:#x}, option {opt})")
            replies.append((kind, self._recv(length)))
            if kind != P.REP_INFO and kind != P.REP_META_CONTEXT:
                return replies

    def _handshake(self, export: bytes, contexts: tuple[bytes, ...]) -> None:
        magic, ihaveopt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != P.NBDMAGIC or ihaveopt != P.IHAVEOPT or not flags & P.FLAG_FIXED_NEWSTYLE:
            raise NbdError("not an NBD server speaking the fixed-newstyle handshake")
        self.sock.sendall(struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | (flags & P.FLAG_NO_ZEROES)))
        self.structured = self._option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
        if self.structured and contexts:
            query = struct.pack(">I", len(export)) + export + struct.pack(">I", len(contexts)) \
                + b"".join(struct.pack(">I", len(c)) + c for c in contexts)
            for kind, data in self._option(P.OPT_SET_META_CONTEXT, query):
                if kind == P.REP_META_CONTEXT:
                    self.contexts[data[4:]] = struct.unpack(">I", data[:4])[0]
        go = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
        replies = self._option(P.OPT_GO, go)
        if replies[-1][0] != P.REP_ACK:
            raise NbdError(f"the export {export.decode()!r} was refused (reply {replies[-1][0]:#x})")
        info = next((d for k, d in replies if k == P.REP_INFO and struct.unpack(">H", d[:2])[0] == P.INFO_EXPORT),
                    None)
        if info is None:
            raise NbdError("the server did not say the export's size")
        _, self.size, self.flags = struct.unpack(">HQH", info[:12])

    # --- transmission -----------------------------------------------------------------
    def _request(self, command: int, offset: int, length: int) -> int:
        self._cookie += 1
        try:
            self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, command, self._cookie, offset, length))
        except TimeoutError:
            raise NbdError(f"the NBD export took no request within {IO_SECONDS:g}s") from None
        except OSError as e:
            raise NbdError(f"the NBD export closed the connection ({e.strerror})") from e
        return self._cookie

    def _chunks(self, cookie: int, into: tuple[int, memoryview] | None = None):
        """The structured reply chunks of one request: (type, payload), until done.
        ``into``: (the request's offset, a buffer of its length): the data of each
        OFFSET_DATA chunk is received straight into its place there (no copy of the
        bytes under the GIL) and that chunk is yielded with its 8-byte offset only."""
        while True:
            magic, flags, kind, got, length = P.STRUCTURED.unpack(self._recv(P.STRUCTURED.size))
            if magic != P.STRUCTURED_REPLY_MAGIC or got != cookie:
                raise NbdError(f"bad reply (magic {magic:#x}, cookie {got} for {cookie})")
            if into is not None and kind == P.REPLY_OFFSET_DATA and length >= 8:
                head = self._recv(8)
                (at,) = struct.unpack(">Q", head)
                start, view = at - into[0], into[1]
                if start < 0 or start + length - 8 > len(view):
                    raise NbdError(f"a reply of {length - 8} bytes at {at} lies outside the request "
                                   f"({into[0]}, {len(view)} bytes)")
                self._recv_into(view[start:start + length - 8])
                payload = head
            else:
                payload = self._recv(length)
            if kind in (P.REPLY_ERROR, P.REPLY_ERROR_OFFSET):
                errno, msg_len = struct.unpack(">IH", payload[:6])
                raise NbdError(f"the NBD export failed a request: {os.strerror(errno)} "
                               f"{payload[6:6 + msg_len].decode(errors='replace')}".rstrip())
            yield kind, payload
            if flags & P.REPLY_FLAG_DONE:
                return

    def read(self, offset: int, length: int) -> bytearray:
        """``length`` bytes from ``offset``, received into one new buffer."""
        cookie = self._request(P.CMD_READ, offset, length)
        if not self.structured:
            magic, error, got = P.SIMPLE.unpack(self._recv(P.SIMPLE.size))
            if magic != P.SIMPLE_REPLY_MAGIC or got != cookie:
                raise NbdError(f"bad reply (magic {magic:#x}, cookie {got} for {cookie})")
            if error:
                raise NbdError(f"the NBD export failed a read at {offset}: {os.strerror(error)}")
            data = bytearray(length)
            self._recv_into(memoryview(data))
            return data
        out = bytearray(length)  # a hole reads as the zeros already here
        for _kind, _payload in self._chunks(cookie, (offset, memoryview(out))):
            pass  # data lands in ``out``; holes stay zeros
        return out

    def extents(self, offset: int, length: int, context: bytes = P.BASE_ALLOCATION) -> list[tuple[int, int, int]]:
        """(offset, length, flags) of ``context`` from ``offset`` on (at most ``length``);
        NbdError when the server did not agree to that context."""
        wanted = self.contexts.get(context)
        if wanted is None:
            raise NbdError(f"the NBD export offers no metadata context {context.decode()!r}")
        cookie = self._request(P.CMD_BLOCK_STATUS, offset, length)
        out, at = [], offset
        for kind, payload in self._chunks(cookie):
            if kind == P.REPLY_BLOCK_STATUS and struct.unpack(">I", payload[:4])[0] == wanted:
                for i in range(4, len(payload), 8):
                    n, flags = struct.unpack(">II", payload[i:i + 8])
                    out.append((at, n, flags))
                    at += n
        return out


class NbdReader:
    """One NBD export read from many threads, each with a connection of its own:
    ``read(offset, length)``, ``virtual_size``, ``ranges(context, test)``."""

    def __init__(self, path: str, export: str = "", contexts: tuple[bytes, ...] = (P.BASE_ALLOCATION,)) -> None:
        self.path, self.export, self.contexts = path, export, contexts
        self._local = threading.local()
        self._clients: list[NbdClient] = []
        self._lock = threading.Lock()
        self.virtual_size = self._client().size

    def _client(self) -> NbdClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = NbdClient(self.path, self.export, self.contexts)
            with self._lock:
                self._clients.append(client)
        return client

    def read(self, offset: int, length: int) -> bytearray:
        return self._client().read(offset, length)

    def offers(self, context: bytes) -> bool:
        """Whether the server agreed to the metadata context ``context``."""
        return context in self._client().contexts

    def ranges(self, context: bytes, test: Callable[[int], bool]) -> list[tuple[int, int]]:
        """The ranges whose ``context`` flags pass ``test``, merged, in order."""
        client, at = self._client(), 0
        out: list[tuple[int, int]] = []
        while at < self.virtual_size:
            extents = client.extents(at, min(self.virtual_size - at, 2**31), context)
            if not extents:
                raise NbdError(f"no block status for {self.export or 'the export'} at {at}")
            for offset, length, flags in extents:
                if test(flags):
                    if out and out[-1][0] + out[-1][1] == offset:
                        out[-1] = (out[-1][0], out[-1][1] + length)
                    else:
                        out.append((offset, length))
                at = offset + length
        return out

    def held(self) -> list[tuple[int, int]]:
        """The ranges that hold data (neither holes nor zeros)."""
        return self.ranges(P.BASE_ALLOCATION, lambda flags: not flags & P.STATE_ZERO)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


class ImageExport:
    """``with ImageExport(path, fmt, directory) as disk:`` qemu-nbd serves the image
    read-only; ``disk.read(offset, length)`` from any thread, ``disk.virtual_size``,
    ``disk.held()`` (the ranges that hold data)."""

    def __init__(self, image: Path, fmt: str, directory: Path) -> None:
        if shutil.which(QEMU_NBD) is None:
            raise ToolFailed("qemu-nbd is not installed (Debian: apt-get install qemu-utils)")
        if not fmt:
            raise ToolFailed(f"qemu-nbd: the format of {image} is unknown; refusing to guess it")
        self.image = image
        self._place = P.SocketPlace(directory, image.name)
        self.socket = self._place.path
        self._reader: NbdReader | None = None
        self._proc = subprocess.Popen(
            [QEMU_NBD, "--read-only", f"--format={fmt}", f"--shared={CONNECTIONS}", "--persistent",
             f"--socket={self.socket}", str(image)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(self._place.fd,))
        try:
            self._reader = self._wait_listening()
        except BaseException:
            self.close()
            raise
        self.virtual_size = self._reader.virtual_size

    def _wait_listening(self) -> NbdReader:
        """The first connection, once qemu-nbd serves. It listens before it opens the
        image, so a connection can be cut by qemu-nbd exiting (the image is locked by a
        running QEMU, say): what it said then is the error, not the cut connection."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc.stderr else ""
                raise ToolFailed(f"qemu-nbd could not export {self.image}: {err or f'exit {self._proc.returncode}'}")
            try:
                return NbdReader(self.socket)
            except (OSError, NbdError) as e:
                if time.monotonic() > deadline:
                    raise ToolFailed(f"qemu-nbd did not start serving {self.image} within {START_SECONDS:g}s: "
                                     f"{e}") from None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(0.05 if isinstance(e, NbdError) else 0.02)

    def __enter__(self) -> ImageExport:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytearray:
        assert self._reader is not None
        return self._reader.read(offset, length)

    def held(self) -> list[tuple[int, int]]:
        assert self._reader is not None
        return self._reader.held()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._proc.stderr:
            self._proc.stderr.close()
        self._place.remove()

"""One disk of a format-2 point served read-only over NBD, straight from its chunks.

A restore hands the export to ``qemu-img convert`` as its source, so the destination
image is written in one pass: no copy of the disk in scratch space first. Each read is
answered from the chunks it covers (fetched and authenticated by the ``ChunkStore``,
several requests at a time; their ids are not computed again, see objects.py); zero
pieces are reported as holes through the ``base:allocation`` metadata context, so QEMU
never reads them and leaves them unallocated in the destination.

The server speaks the fixed-newstyle handshake with ``NBD_OPT_GO`` (and the older
``NBD_OPT_EXPORT_NAME``), structured replies, ``NBD_CMD_READ``, ``NBD_CMD_BLOCK_STATUS``
and ``NBD_CMD_DISC``; anything else is refused (a write with EPERM). It serves its one
export under any name, on a Unix socket in a directory the caller gives (a restore: the
job's scratch directory, which the job's end and any retry clear, so a killed worker
leaves no socket behind). That directory's path may be longer than a socket address
allows (108 bytes), so the socket is bound and reached through
``/proc/self/fd/<fd of the directory>/``: ``qemu-img`` gets the same descriptor
(``NbdDisk.fd``) and the same path.

A chunk that cannot be read (missing, damaged, sealed under another id, or the storage
unreachable) fails the read with EIO; the first such failure (a damaged chunk's names
the disk and offset) is kept in ``failure`` for the caller to raise instead of
qemu-img's "Input/output error", and the ids of damaged or missing chunks in
``unreadable`` (the restore takes the points that use them out of service).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from virtwarden.storage_backends.format2.index import DiskIndex
from virtwarden.storage_backends.format2.objects import DamagedObject
from virtwarden.storage_backends.format2.store import ChunkStore

from virtwarden import faults
from virtwarden import nbd_protocol as P
from virtwarden.errors import ObjectNotFound

log = logging.getLogger(__name__)

CONTEXT_ID = 1  # the one metadata context served: base:allocation
SERVING = "restore-serving"  # test fault point: a read was answered, qemu-img is writing the image
IOV_MAX = 1024  # buffers per sendmsg (Linux)
MAX_REQUEST = 32 << 20  # the protocol's default largest request; QEMU asks for less


class ChunkExport:
    """``with ChunkExport(store, index, directory) as export:`` serves the disk on a
    socket in ``directory`` (mode 0600: this user's only) until the block ends; a
    process given the descriptor ``export.fd`` reaches it at ``export.socket``.
    ``workers`` reads are answered at a time (by default the storage target's
    ``chunk_concurrency``)."""

    def __init__(self, store: ChunkStore, index: DiskIndex, directory: Path, *, workers: int | None = None) -> None:
        self.store, self.index = store, index
        # The first read that failed: a DamagedObject naming disk and offset, or what the
        # storage raised (unreachable, refusing): the caller raises it, not qemu-img's P.EIO.
        self.failure: Exception | None = None
        self.unreadable: set[str] = set()  # ids of the chunks found damaged or missing
        self._place = P.SocketPlace(directory, index.target)
        self.fd, self.socket = self._place.fd, self._place.path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.socket)
            # Whatever the umask: connecting needs write permission on the socket. (The
            # scratch directory around it is private as well.)
            os.chmod(self._place.name, 0o600, dir_fd=self.fd)
        except OSError:
            self._listener.close()
            self._place.remove()
            raise
        self._listener.listen(4)
        self._pool = ThreadPoolExecutor(workers or store.workers, thread_name_prefix=f"nbd-{index.target}")
        self._closing = threading.Event()
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name=f"nbd-{index.target}", daemon=True)

    def __enter__(self) -> ChunkExport:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._place.remove()

    # --- connections ------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"nbd-{self.index.target}-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                session = _Session(self, conn)
                if session.handshake():
                    session.transmit()
        except (OSError, ConnectionError, _Closed):
            pass  # the client went away (qemu-img ended, or was killed): nothing to answer
        finally:
            with self._lock:
                self._connections = [c for c in self._connections if c is not conn]

    # --- what the export reads --------------------------------------------------------
    def read(self, offset: int, length: int) -> list[bytes | memoryview]:
        """``length`` bytes of the disk at ``offset``, from the chunks that hold them: the
        pieces in order, uncopied (a reply sends them as they are)."""
        size = self.index.chunk_size
        parts: list[bytes | memoryview] = []
        end = offset + length
        while offset < end:
            i, inside = divmod(offset, size)
            piece_len = min(size, self.index.virtual_size - i * size)
            take = min(piece_len - inside, end - offset)
            cid = self.index.chunks[i]
            if cid is None:
                parts.append(bytes(take))
            else:
                data = self._chunk(i * size, cid, piece_len)
                parts.append(data if (inside, take) == (0, piece_len) else memoryview(data)[inside:inside + take])
            offset += take
        return parts

    def _chunk(self, offset: int, cid: str, length: int) -> bytes:
        target = self.index.target
        try:
            data = self.store.get(cid, check_id=False)  # authenticated: the tag binds it to its id
        except DamagedObject as e:
            raise self._failed(DamagedObject(f"{target} at offset {offset}: {e}"), cid) from e
        except ObjectNotFound as e:
            raise self._failed(DamagedObject(f"{target} at offset {offset}: chunk {cid} is missing"), cid) from e
        if len(data) != length:
            raise self._failed(DamagedObject(f"{target} at offset {offset}: chunk {cid} holds {len(data)} bytes, "
                                             f"the index says {length}"))
        return data

    def _failed(self, e: Exception, cid: str | None = None) -> Exception:
        with self._lock:
            if self.failure is None:
                self.failure = e
            if cid is not None:
                self.unreadable.add(cid)
        return e

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` descriptors (length, flags) covering ``offset`` to at most
        ``offset + length``: zero pieces are holes that read as zeros."""
        size = self.index.chunk_size
        out: list[tuple[int, int]] = []
        end = min(offset + length, self.index.virtual_size)
        while offset < end:
            i = offset // size
            flags = P.STATE_HOLE | P.STATE_ZERO if self.index.chunks[i] is None else 0
            take = min((i + 1) * size, end) - offset
            if out and out[-1][1] == flags and out[-1][0] + take < 2**32:
                out[-1] = (out[-1][0] + take, flags)
            else:
                out.append((take, flags))
            offset += take
        return out


class _Closed(Exception):
    """The client closed the connection."""


class _Session:
    """One client connection: the handshake, then requests until it disconnects."""

    def __init__(self, export: ChunkExport, conn: socket.socket) -> None:
        self.export, self.conn = export, conn
        self.structured = False
        self.allocation = False  # base:allocation was negotiated
        self.no_zeroes = False
        self._send_lock = threading.Lock()

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.conn.recv(n - len(buf))
            if not part:
                raise _Closed
            buf += part
        return bytes(buf)

    def _send(self, *parts: bytes | memoryview) -> None:
        """Send ``parts`` as one message, without joining them (a read's reply is megabytes)."""
        views = [memoryview(p) for p in parts if len(p)]
        with self._send_lock:
            while views:
                sent = self.conn.sendmsg(views[:IOV_MAX])
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0], sent = views[0][sent:], 0

    # --- handshake ------------------------------------------------------------------
    def handshake(self) -> bool:
        """Negotiate until the client picks the export (True) or aborts (False)."""
        self._send(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", self._recv(4))
        if not client_flags & P.FLAG_FIXED_NEWSTYLE:
            return False
        self.no_zeroes = bool(client_flags & P.FLAG_NO_ZEROES)
        while True:
            magic, option, length = struct.unpack(">QII", self._recv(16))
            if magic != P.IHAVEOPT or length > 65536:
                return False
            data = self._recv(length)
            if option == P.OPT_EXPORT_NAME:  # no reply but the export itself
                self._send(struct.pack(">QH", self.export.index.virtual_size, self._flags()),
                           b"" if self.no_zeroes else bytes(124))
                return True
            if option == P.OPT_ABORT:
                self._reply(option, P.REP_ACK)
                return False
            if option in (P.OPT_INFO, P.OPT_GO):
                self._reply(option, P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, self.export.index.virtual_size,
                                                          self._flags()))
                self._reply(option, P.REP_ACK)
                if option == P.OPT_GO:
                    return True
            elif option == P.OPT_STRUCTURED_REPLY and not data:
                self.structured = True
                self._reply(option, P.REP_ACK)
            elif option in (P.OPT_SET_META_CONTEXT, P.OPT_LIST_META_CONTEXT) and self.structured:
                queries = _meta_queries(data)
                if queries is None:
                    self._reply(option, P.REP_ERR_INVALID)
                    continue
                wanted = any(q in (P.BASE_ALLOCATION, b"base:") for q in queries) or \
                    (option == P.OPT_LIST_META_CONTEXT and not queries)
                if wanted:
                    self._reply(option, P.REP_META_CONTEXT, struct.pack(">I", CONTEXT_ID) + P.BASE_ALLOCATION)
                if option == P.OPT_SET_META_CONTEXT:
                    self.allocation = wanted
                self._reply(option, P.REP_ACK)
            else:
                self._reply(option, P.REP_ERR_UNSUP)

    def _flags(self) -> int:
        return P.HAS_FLAGS | P.READ_ONLY | P.CAN_MULTI_CONN

    def _reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self._send(struct.pack(">QIII", P.OPT_REPLY_MAGIC, option, kind, len(data)), data)

    # --- transmission ---------------------------------------------------------------
    def transmit(self) -> None:
        pending: list[Future[None]] = []
        try:
            while True:
                magic, flags, kind, handle, offset, length = P.REQUEST.unpack(self._recv(P.REQUEST.size))
                if magic != P.REQUEST_MAGIC:
                    return
                if kind == P.CMD_DISC:
                    return
                if kind == P.CMD_WRITE:
                    if length > MAX_REQUEST:
                        return  # its payload follows: no way to answer but to hang up
                    self._recv(length)  # read past the payload that comes with the request
                    self._error(handle, P.EPERM)
                elif kind == P.CMD_READ and length <= MAX_REQUEST and offset + length <= self.export.index.virtual_size:
                    pending = [f for f in pending if not f.done()]
                    pending.append(self.export._pool.submit(self._read, handle, offset, length))
                elif kind == P.CMD_BLOCK_STATUS and self.allocation and length and \
                        offset + length <= self.export.index.virtual_size:
                    extents = self.export.extents(offset, length)
                    self._status(handle, extents[:1] if flags & P.CMD_FLAG_REQ_ONE else extents)
                else:
                    self._error(handle, P.EINVAL)
        finally:
            for f in pending:  # answered before the connection closes
                f.result()

    def _read(self, handle: int, offset: int, length: int) -> None:
        if self.export.failure is not None:  # the restore fails anyway: fetch nothing more
            self._error(handle, P.EIO)
            return
        try:
            parts = self.export.read(offset, length)
        except DamagedObject as e:  # kept in failure by _chunk
            log.warning("restore read: %s", e)
            self._error(handle, P.EIO)
            return
        except Exception as e:  # noqa: BLE001 - storage unreachable or refusing: the caller raises it
            log.warning("restore read of %s at offset %d failed: %s", self.export.index.target, offset, e)
            self.export._failed(e)
            self._error(handle, P.EIO)
            return
        try:
            if self.structured:
                self._send(P.STRUCTURED.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_OFFSET_DATA, handle,
                                             8 + length), struct.pack(">Q", offset), *parts)
            else:
                self._send(struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 0, handle), *parts)
        except OSError:
            return  # the client went away
        faults.pause_point(SERVING)

    def _status(self, handle: int, extents: list[tuple[int, int]]) -> None:
        body = struct.pack(">I", CONTEXT_ID) + b"".join(struct.pack(">II", n, f) for n, f in extents)
        self._send(struct.pack(">IHHQI", P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_BLOCK_STATUS, handle,
                               len(body)), body)

    def _error(self, handle: int, errno: int) -> None:
        if self.structured:
            self._send(struct.pack(">IHHQIIH", P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_ERROR, handle, 6,
                                   errno, 0))
        else:
            self._send(struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, errno, handle))


def _meta_queries(data: bytes) -> list[bytes] | None:
    """The queries of a SET/LIST_META_CONTEXT option (the export name is not checked:
    there is one export); None when the option is malformed."""
    try:
        (name_len,) = struct.unpack_from(">I", data, 0)
        pos = 4 + name_len
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(n):
            (q_len,) = struct.unpack_from(">I", data, pos)
            queries.append(data[pos + 4:pos + 4 + q_len])
            pos += 4 + q_len
        return queries if pos == len(data) else None
    except struct.error:
        return None

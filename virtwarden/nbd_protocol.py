"""The NBD protocol's numbers, for virtwarden's server (a format-2 point's disk served
from its chunks, storage_backends/format2/nbd.py) and client (reading a disk image that
qemu-nbd exports, hypervisor/nbd.py): the fixed-newstyle handshake, simple and
structured replies, reads and block status. From the protocol's specification,
https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import struct
from pathlib import Path

# The handshake
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID = 2**31 + 1, 2**31 + 3
INFO_EXPORT = 0
# Transmission
HAS_FLAGS, READ_ONLY, CAN_MULTI_CONN = 1, 2, 1 << 8
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
CMD_READ, CMD_WRITE, CMD_DISC, CMD_BLOCK_STATUS = 0, 1, 2, 7
CMD_FLAG_REQ_ONE = 1 << 3
REPLY_FLAG_DONE = 1
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE, REPLY_BLOCK_STATUS = 0, 1, 2, 5
REPLY_ERROR, REPLY_ERROR_OFFSET = 2**15 + 1, 2**15 + 2
STATE_HOLE, STATE_ZERO = 1, 2
EPERM, EIO, EINVAL = 1, 5, 22
BASE_ALLOCATION = b"base:allocation"
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
STRUCTURED = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie


class SocketPlace:
    """Where an NBD Unix socket lives: a new name in ``directory``, reached through
    ``/proc/self/fd/<fd>/`` of a descriptor of that directory (``path``), so a directory
    path longer than a socket address allows (108 bytes) does not matter. A process
    given the descriptor (``fd``, same number) reaches it by the same ``path``."""

    def __init__(self, directory: Path, stem: str) -> None:
        self.fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.name = f"nbd-{stem}-{secrets.token_hex(4)}.sock"
        self.path = f"/proc/self/fd/{self.fd}/{self.name}"

    def remove(self) -> None:
        """The socket file gone (if it was made), the descriptor closed."""
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self.fd)
        os.close(self.fd)

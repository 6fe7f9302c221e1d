"""The index of one disk in one restore point: which chunk holds each piece of the
disk's virtual address space. Complete on its own: restoring a disk needs its index and
the chunks it names, never another point's.

Encoding (before it is sealed as an ``index`` object, docs/repository-format.md)::

    {"target": "vda", "virtual_size": N, "chunk_size": C, "count": K}\\n
    K ids of 32 bytes each, in address order

K is ceil(N / C). An id of 32 zero bytes means the piece reads as zeros and no chunk
is stored for it (a keyed hash of all zeros cannot occur in practice).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from virtwarden.storage_backends.format2.objects import DamagedObject

ID_BYTES = 32
ZERO_ID = bytes(ID_BYTES)


@dataclass(frozen=True)
class DiskIndex:
    target: str
    virtual_size: int
    chunk_size: int
    chunks: tuple[str | None, ...]  # hex ids in address order; None: the piece is all zeros

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.virtual_size < 0:
            raise ValueError(f"index of {self.target}: bad sizes {self.virtual_size}/{self.chunk_size}")
        if len(self.chunks) != count(self.virtual_size, self.chunk_size):
            raise ValueError(f"index of {self.target}: {len(self.chunks)} chunks for {self.virtual_size} bytes "
                             f"in chunks of {self.chunk_size}")

    def pieces(self) -> Iterator[tuple[int, int, str | None]]:
        """(offset, length, chunk id or None) for each piece of the disk."""
        for i, cid in enumerate(self.chunks):
            offset = i * self.chunk_size
            yield offset, min(self.chunk_size, self.virtual_size - offset), cid

    def referenced(self) -> set[str]:
        return {c for c in self.chunks if c is not None}

    def encode(self) -> bytes:
        head = json.dumps({"target": self.target, "virtual_size": self.virtual_size,
                           "chunk_size": self.chunk_size, "count": len(self.chunks)}, sort_keys=True)
        body = b"".join(ZERO_ID if c is None else bytes.fromhex(c) for c in self.chunks)
        return head.encode() + b"\n" + body

    @classmethod
    def decode(cls, data: bytes, *, what: str = "index") -> DiskIndex:
        head, sep, body = data.partition(b"\n")
        try:
            meta = json.loads(head)
            n = int(meta["count"])
            if not sep or len(body) != n * ID_BYTES:
                raise ValueError(f"{len(body)} bytes of ids for {n} chunks")
            ids = tuple(None if (raw := body[i:i + ID_BYTES]) == ZERO_ID else raw.hex()
                        for i in range(0, len(body), ID_BYTES))
            return cls(str(meta["target"]), int(meta["virtual_size"]), int(meta["chunk_size"]), ids)
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedObject(f"{what}: not a disk index: {e}") from e


def count(virtual_size: int, chunk_size: int) -> int:
    return -(-virtual_size // chunk_size)

"""Where a block device's bytes live: the `BlockBackend` interface and two implementations.

`FileBackend` does vectored I/O straight between the disk file and views of guest memory
(`os.preadv`/`os.pwritev` on memoryviews: zero copy). `MemoryBackend` is the in-memory
fake for tests (the httpx MockTransport / crosvm FakeTap idea).

Errors here are the host's, never the guest's: a `BackendError` becomes VIRTIO_BLK_S_IOERR.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

Buffers = Sequence[memoryview]


class BackendError(Exception):
    """The host-side disk failed an operation (I/O error, file shrank, ...)."""


class BlockBackend(Protocol):
    @property
    def size(self) -> int:
        """Disk size in bytes."""

    def preadv(self, buffers: Buffers, offset: int) -> int:
        """Fill all of `buffers` from `offset`; returns bytes read or raises BackendError."""

    def pwritev(self, buffers: Buffers, offset: int) -> int:
        """Write all of `buffers` at `offset`; returns bytes written or raises BackendError."""

    def flush(self) -> None:
        """Make completed writes durable."""


def _drop_front(buffers: list[memoryview], n: int) -> list[memoryview]:
    """`buffers` without their first `n` bytes (after a short transfer)."""
    while n and buffers:
        if n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers = buffers[1:]
        else:
            buffers = [buffers[0][n:], *buffers[1:]]
            n = 0
    return buffers


class FileBackend:
    """A disk image or block device opened by the supervisor and passed in as an fd.

    Owns the fd: `close()` closes it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)  # also right for block devices (st_size is 0)

    def preadv(self, buffers: Buffers, offset: int) -> int:
        return self._transfer(os.preadv, buffers, offset, "read")

    def pwritev(self, buffers: Buffers, offset: int) -> int:
        return self._transfer(os.pwritev, buffers, offset, "write")

    def _transfer(
        self, op: Callable[[int, list[memoryview], int], int], buffers: Buffers, offset: int, what: str
    ) -> int:
        pending = buffers if isinstance(buffers, list) and all(buffers) else [b for b in buffers if len(b)]
        done = 0
        while pending:
            try:
                n = op(self.fd, pending, offset + done)
            except OSError as e:
                raise BackendError(f"disk {what} at offset {offset + done} failed: {e.strerror}") from e
            if n == 0:
                raise BackendError(f"disk {what} at offset {offset + done} hit the end of the file")
            done += n
            pending = _drop_front(pending, n)
        return done

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise BackendError(f"disk flush failed: {e.strerror}") from e

    def close(self) -> None:
        os.close(self.fd)


class MemoryBackend:
    """A disk held in a bytearray; `fail` makes every operation raise (to test IOERR)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.fail = False
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def _check(self, offset: int, length: int) -> None:
        if self.fail:
            raise BackendError("injected failure")
        if offset + length > len(self.data):
            raise BackendError(f"[{offset}, +{length}) is past the end of the disk")

    def preadv(self, buffers: Buffers, offset: int) -> int:
        self._check(offset, sum(len(b) for b in buffers))
        for buf in buffers:
            buf[:] = self.data[offset : offset + len(buf)]
            offset += len(buf)
        return sum(len(b) for b in buffers)

    def pwritev(self, buffers: Buffers, offset: int) -> int:
        self._check(offset, sum(len(b) for b in buffers))
        for buf in buffers:
            self.data[offset : offset + len(buf)] = buf
            offset += len(buf)
        return sum(len(b) for b in buffers)

    def flush(self) -> None:
        self._check(0, 0)
        self.flushes += 1

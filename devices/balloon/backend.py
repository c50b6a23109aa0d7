"""How the balloon gives pages back to the host: the `PageBackend` interface and two kinds.

`MemfdPunchHole` calls fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) on the
guest-memory memfd. The hole is in the file, not in one process's mapping: the pages are
freed once, for every process that maps the memfd (the vCPU worker's KVM slots, each device
worker), and any of them that touches the range again gets a fresh zero page. madvise
(MADV_DONTNEED), Firecracker's choice for its private anonymous memory, would only drop
this worker's page-table entries of a shared mapping and free nothing. KEEP_SIZE keeps the
file's size, which its seals (no shrink, no grow) require anyway. The worker's seccomp
policy allows fallocate with exactly this mode on exactly this fd (policy.py).

`RecordingBackend` is the in-memory fake for tests.
"""

from __future__ import annotations

import ctypes
import os
from typing import Protocol

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PUNCH_HOLE_MODE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class BackendError(Exception):
    """The host could not release a range (the guest's request still completes)."""


class PageBackend(Protocol):
    def discard(self, offset: int, length: int) -> None:
        """Give memfd bytes [offset, offset+length) back to the host; BackendError on failure."""


class MemfdPunchHole:
    """Punches holes in the memfd `fd` (the worker's own copy of the guest-memory fd)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        libc = ctypes.CDLL(None, use_errno=True)  # resolved before the seccomp filter is loaded
        self._fallocate = libc.fallocate
        self._fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
        self._fallocate.restype = ctypes.c_int

    def discard(self, offset: int, length: int) -> None:
        if self._fallocate(self.fd, PUNCH_HOLE_MODE, offset, length) != 0:
            err = ctypes.get_errno()
            raise BackendError(f"fallocate(PUNCH_HOLE) of [{offset:#x}, +{length:#x}) failed: {os.strerror(err)}")


class RecordingBackend:
    """Keeps the ranges it was asked to discard; `fail` makes every call raise."""

    def __init__(self) -> None:
        self.discarded: list[tuple[int, int]] = []
        self.fail = False

    def discard(self, offset: int, length: int) -> None:
        if self.fail:
            raise BackendError("injected failure")
        self.discarded.append((offset, length))

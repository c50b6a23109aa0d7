"""A device worker's log of the guest pages it wrote: one bit per 4 KiB page of the memfd.

KVM's dirty log sees only the vCPUs' writes; a device worker writes guest memory itself
(block reads, net receive, used rings), through `GuestMemory.slice`, which marks every
page it hands out here while the microVM tracks dirty pages (track_dirty_pages). Marking
is conservative: a view taken to read is marked too, so a Diff snapshot may hold a page
that did not change, never miss one that did. The supervisor creates the log (a small
memfd it keeps, like the state area), reads it and clears it when it takes a snapshot,
while the device workers hold (controlplane.snapshot), so no mark is lost between the two.
A hostile worker can mark or clear pages here, which only changes what a Diff of its own
microVM holds: it can write any guest page anyway.
"""

from __future__ import annotations

import contextlib
import mmap
import os

PAGE_SHIFT = 12


def log_bytes(mem_size: int) -> int:
    pages = (mem_size + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
    return max(mmap.PAGESIZE, ((pages + 7) // 8 + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)


def create_dirty_memfd(name: str, mem_size: int) -> int:
    fd = os.memfd_create(f"embervm-{name}-dirty"[:249], os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, log_bytes(mem_size))
    except OSError:
        os.close(fd)
        raise
    return fd


class DirtyLog:
    """The worker's mapping of its dirty log."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._pages = size * 8

    def mark(self, offset: int, length: int) -> None:
        """Pages [offset, offset + length) of the memfd were (or may be) written."""
        first = offset >> PAGE_SHIFT
        last = min((offset + max(length, 1) - 1) >> PAGE_SHIFT, self._pages - 1)
        m = self._map
        for page in range(first, last + 1):
            m[page >> 3] |= 1 << (page & 7)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()


def take_dirty(fd: int) -> int:
    """Supervisor: the log as a bitmap integer (bit n = page n), and clear it."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    os.pwrite(fd, bytes(size), 0)
    return int.from_bytes(data, "little")

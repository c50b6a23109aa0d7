"""The page server of a lazily restored microVM: one supervisor thread that fills guest
memory from the snapshot's memory file, on demand and in the background.

Each worker mapping the (empty) guest memfd registers its mapping with a userfaultfd and
hands it over (shared.uffd). A missing-page fault in any of them is answered here with
UFFDIO_COPY of that page from the memory file (UFFDIO_ZEROPAGE for a hole), which puts the
page in the memfd's page cache for every process at once. Between faults the thread copies
the memory file's remaining data extents in 2 MiB steps the same way (never over a page
that exists: UFFDIO_COPY fails with EEXIST there), so the restore costs no copy up front.
The fill starts once the restore is done (`start_filling`). Once every data extent is in,
the userfaultfds are unregistered (the faults left would be holes, which the memfd fills
with zeros by itself) and the thread ends.

A worker's userfaultfd is kernel state, not worker data: what a hostile worker can do with
its own is to leave its own faults unserved (it hangs) or point the server at another
offset of the same guest memory, which it could write anyway.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import select
import threading
import time

from shared import uffd
from shared.snapshot_memory import data_extents

log = logging.getLogger("embervm.page_server")

PAGE = 4096
FILL_STEP = 2 << 20
MAX_EVENTS = 64


class PageServer:
    def __init__(self, mem_file: int, size: int) -> None:
        self._file = os.dup(mem_file)
        self.size = size
        self._extents = list(data_extents(mem_file, size))
        self._starts = [start for start, _ in self._extents]
        self._buf = mmap.mmap(-1, FILL_STEP)
        self._buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self._uffds: dict[int, int] = {}  # uffd -> the base address of its process's mapping
        self._new: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._fill_extent, self._fill_offset = 0, self._extents[0][0] if self._extents else 0
        self.complete = threading.Event()
        self.filling = threading.Event()  # set by `start_filling` once the microVM runs
        self.faults = 0
        self.filled_bytes = 0
        self.started_at = time.monotonic()
        self.completed_in_s = 0.0
        self._thread = threading.Thread(target=self._run, name="page-server", daemon=True)
        self._thread.start()

    # --- any thread ----------------------------------------------------------------------
    def add(self, fd: int, base: int) -> None:
        """A worker's userfaultfd (ours from now on) and where its mapping starts."""
        uffd.set_nonblocking(fd)
        with self._lock:
            if self._stopping or self.complete.is_set():
                os.close(fd)
                return
            self._new.append((fd, base))
        self._wake()

    def start_filling(self) -> None:
        """Begin the background fill (after the restore: until then only faults are served,
        so the fill does not slow the workers' start)."""
        self.filling.set()
        self._wake()

    def wait_complete(self, timeout: float | None = None) -> bool:
        return self.complete.wait(timeout)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(5.0)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"w")

    # --- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("the page server failed: guest memory may stay unfilled")
        finally:
            for fd in list(self._uffds):
                self._drop(fd, unregister=True)
            with self._lock:
                for fd, _ in self._new:
                    os.close(fd)
                self._new.clear()
            for fd in (self._wake_r, self._wake_w, self._file):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(BufferError):
                self._buf.close()
            self.complete.set()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while True:
            with self._lock:
                if self._stopping:
                    return
                new, self._new = self._new, []
            for fd, base in new:
                self._uffds[fd] = base
                poller.register(fd, select.POLLIN)
            left = self._fill_extent < len(self._extents)
            filling = left and self.filling.is_set()
            if not left and self._uffds:
                self.completed_in_s = time.monotonic() - self.started_at
                log.info("guest memory loaded: %d faults served, %d bytes filled", self.faults, self.filled_bytes)
                return
            events = poller.poll(0 if filling and self._uffds else None)
            for fd, _ in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 512)
                elif fd not in self._uffds or not self._faults(fd):
                    poller.unregister(fd)  # its process is gone (dropped here or while filling)
            if filling and self._uffds:
                self._fill_step()
                time.sleep(0)  # let the supervisor's other threads have the GIL between steps

    def _faults(self, fd: int) -> bool:
        """Serve the faults waiting on `fd`; False when its process is gone."""
        try:
            data = os.read(fd, uffd.MSG_SIZE * MAX_EVENTS)
        except BlockingIOError:
            return True
        except OSError:
            self._drop(fd)
            return False
        if not data:
            self._drop(fd)
            return False
        base = self._uffds[fd]
        for at in range(0, len(data) - uffd.MSG_SIZE + 1, uffd.MSG_SIZE):
            event, _flags, address, _ = uffd.MSG.unpack_from(data, at)
            if event != uffd.UFFD_EVENT_PAGEFAULT:
                continue
            offset = (address - base) & ~(PAGE - 1)
            if 0 <= offset < self.size:
                self.faults += 1
                self._load(fd, base, offset, PAGE, fault=True)
        return True

    def _in_data(self, offset: int) -> bool:
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset < self._extents[i][0] + self._extents[i][1]

    def _load(self, fd: int, base: int, offset: int, length: int, fault: bool, tries: int = 100) -> None:
        """Put [offset, +length) of the memory file into guest memory through `fd`."""
        try:
            if fault and not self._in_data(offset):
                uffd.zeropage(fd, base + offset, length)
                return
            view = memoryview(self._buf)[:length]
            got = os.preadv(self._file, [view], offset)
            view.release()
            if got != length:
                raise OSError(errno.EIO, f"short read of the memory file at {offset:#x}")
            uffd.copy(fd, base + offset, self._buf_addr, length)
            self.filled_bytes += length
        except OSError as e:
            if e.errno == errno.EEXIST and fault:  # loaded meanwhile: wake whoever waits
                with contextlib.suppress(OSError):
                    uffd.wake(fd, base + offset, length)
            elif e.errno in (errno.EEXIST, errno.EAGAIN, errno.EINTR) and length > PAGE:
                for page in range(offset, offset + length, PAGE):  # part of it is in: the rest page by page
                    self._load(fd, base, page, PAGE, fault)
            elif e.errno in (errno.EAGAIN, errno.EINTR) and tries > 0:  # the target mm was busy: again
                time.sleep(0.001)
                self._load(fd, base, offset, length, fault, tries - 1)
            elif e.errno in (errno.ESRCH, errno.ENOENT, errno.EBADF):
                self._drop(fd)
            elif e.errno != errno.EEXIST:
                raise

    def _fill_step(self) -> None:
        """Copy the next (up to) 2 MiB of the memory file's data extents."""
        start, length = self._extents[self._fill_extent]
        end = start + length
        step = min(FILL_STEP, end - self._fill_offset)
        fd = next(iter(self._uffds))
        self._load(fd, self._uffds[fd], self._fill_offset, step, fault=False)
        if fd not in self._uffds:  # its process is gone: the step again, through another one
            return
        self._fill_offset += step
        if self._fill_offset >= end:
            self._fill_extent += 1
            if self._fill_extent < len(self._extents):
                self._fill_offset = self._extents[self._fill_extent][0]

    def _drop(self, fd: int, unregister: bool = False) -> None:
        base = self._uffds.pop(fd, None)
        if base is not None and unregister:
            with contextlib.suppress(OSError):
                uffd.unregister(fd, base, self.size)
        with contextlib.suppress(OSError):
            os.close(fd)

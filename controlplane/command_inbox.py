"""Work that API threads hand the monitor thread, the only thread that changes a running
microVM's device slots and talks to its workers, and the pipe that wakes it."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable

Work = Callable[[], None]


class CommandInbox:
    """A queue of work for the monitor thread; closed when the microVM stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._closed = False
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # the monitor polls wake_fd

    def post(self, work: Work) -> bool:
        """Have the monitor thread run `work` (False: the microVM has stopped, nothing runs it)."""
        with self._lock:
            if self._closed:
                return False
            self._queue.put(work)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"c")
        return True

    def run(self, run_one: Callable[[Work], None]) -> None:
        """In the monitor thread: run what was posted, in order, each through `run_one`
        (which keeps one failing from stopping the rest)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_fd, 256):
                pass
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                return
            run_one(work)

    def close(self) -> None:
        """Refuse what is posted from now on (API threads are told at once)."""
        with self._lock:
            self._closed = True

    def empty(self) -> bool:
        return self._queue.empty()

    def close_fds(self) -> None:
        for fd in (self.wake_fd, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

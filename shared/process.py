"""Process-level helpers every worker uses right after it is forked."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Iterable

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def set_process_name(name: str) -> None:
    """Set the kernel's name for this thread (what `ps -o comm` and /proc/<pid>/comm show)."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def die_with_parent(signal_number: int) -> None:
    """Ask the kernel to send `signal_number` to this process when its parent dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0)


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every fd of this process but `keep` (a worker holds only the fds it needs)."""
    keep_set = set(keep)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep_set:
            with contextlib.suppress(OSError):  # the listdir's own fd is already gone
                os.close(fd)


def reset_inherited_io() -> None:
    """Point Python's stdio and logging at this process's fds 0-2 only.

    A forked worker inherits the parent's `sys.stdout`/`sys.stderr` objects and logging
    handlers, which may hold fds it has just closed (a log file, a test runner's capture
    file). Their numbers are reused by the worker's own fds, so a log line would be written
    into a socket or a memfd. Call it right after `close_fds_except` and the dup2s of 0-2:
    every logger then propagates to one handler on the root logger, writing to fd 2.
    """
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 stays open; the object is the process's stdin
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    manager = logging.Logger.manager
    for logger in [logging.getLogger(), *(lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger))]:
        logger.handlers = []
        logger.propagate = True
    logging.getLogger().handlers = [logging.StreamHandler(sys.stderr)]

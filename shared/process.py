"""Process-level helpers every worker uses right after it is forked."""

from __future__ import annotations

import contextlib
import ctypes
import os
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

"""Opt-in timestamps of a launch's steps, for the benchmarks' start-up profile.

`EMBERVM_STARTUP_TRACE=PATH` makes each `mark(label)` append "<CLOCK_MONOTONIC ns> <pid>
<label>" to PATH; unset (always, outside a benchmark), `mark` reads one environment variable
and returns. CLOCK_MONOTONIC is one clock for every process of the host, so the client's,
the fork server's, the VMM's and the workers' lines order into one timeline. Each mark opens
the file anew, except in a worker that called `hold()` while it could still open files: its
later marks, under its seccomp filter, write to the fd it keeps (workers close no fd).
"""

from __future__ import annotations

import contextlib
import os
import time

ENV_VAR = "EMBERVM_STARTUP_TRACE"
_held: tuple[int, int] | None = None  # (pid, fd) of `hold()`; an fd inherited over fork is not ours


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def hold() -> None:
    """Keep the trace file open for this process's later marks (a worker, before its filter)."""
    global _held
    path = os.environ.get(ENV_VAR)
    if path:
        try:
            _held = (os.getpid(), _open(path))
        except OSError:
            _held = None


def mark(label: str) -> None:
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    line = f"{time.monotonic_ns()} {os.getpid()} {label}\n".encode()
    if _held is not None and _held[0] == os.getpid():
        with contextlib.suppress(OSError):
            os.write(_held[1], line)
        return
    try:
        fd = _open(path)
    except OSError:
        return
    try:
        os.write(fd, line)
    finally:
        os.close(fd)

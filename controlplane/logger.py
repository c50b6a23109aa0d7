"""Firecracker's human-readable log, on top of Python's logging.

Each line is `<local time, ns> [<instance id>:<thread>(:<LEVEL>)(:<file>:<line>)] <message>`,
as Firecracker writes it, so log scrapers written for Firecracker keep working. The
destination is a file or a named pipe, opened non-blocking: a pipe nobody reads must never
stall the VMM, so a line that does not fit is dropped and counted (logger.missed_log_count).
Until a destination is configured, lines go to stderr (stdout carries the guest console).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {
    "Off": logging.CRITICAL + 10,
    "Error": logging.ERROR,
    "Warning": logging.WARNING,
    "Info": logging.INFO,
    "Debug": logging.DEBUG,
    "Trace": TRACE,
}


def level_name(value: str) -> str | None:
    """The LEVELS name for `value`, as Firecracker parses a level: any case, and "warn" or
    "warning" alike; None if it is no level."""
    lowered = value.lower()
    if lowered == "warn":
        return "Warning"
    return next((name for name in LEVELS if name.lower() == lowered), None)


_SHOWN = {logging.ERROR: "ERROR", logging.WARNING: "WARN", logging.INFO: "INFO", logging.DEBUG: "DEBUG"}
_SHOWN[logging.CRITICAL] = "ERROR"
_SHOWN[TRACE] = "TRACE"

ROOT = "embervm"
API_LOGGER = "embervm.api"
_REPO = Path(__file__).resolve().parent.parent


class SinkError(OSError):
    """A log or metrics destination that cannot be opened."""


class LineSink:
    """A file or FIFO taking whole lines through non-blocking writes; thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
        except FileNotFoundError:
            is_fifo = False
        except OSError as err:
            raise SinkError(err.errno, f"{err.strerror}: {path}") from None
        # A FIFO is opened read-write so that opening does not wait for (or fail without) a reader.
        flags = os.O_RDWR if is_fifo else os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            self._fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o640)
        except OSError as err:
            raise SinkError(err.errno, f"{err.strerror} (os error {err.errno}): {path}") from None
        self._lock = threading.Lock()

    def write_line(self, line: str) -> bool:
        """Write one line; False when it could not be written whole (full pipe, I/O error)."""
        data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
        with self._lock:
            if self._fd < 0:
                return False
            try:
                written = os.write(self._fd, data)
                while written < len(data):
                    written += os.write(self._fd, data[written:])
            except OSError:
                return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class FcFormatter(logging.Formatter):
    """Formats records the way Firecracker prints its log lines."""

    def __init__(self, instance_id: str, show_level: bool, show_origin: bool) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_origin = show_origin

    def format(self, record: logging.LogRecord) -> str:
        now = time.time_ns()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now // 1_000_000_000))
        head = f"{stamp}.{now % 1_000_000_000:09d} [{self.instance_id}:{_thread(record)}"
        if self.show_level:
            head += ":" + _SHOWN.get(record.levelno, record.levelname)
        if self.show_origin:
            head += f":{_origin(record.pathname)}:{record.lineno}"
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info).replace("\n", " | ")
        return f"{head}] {message}"


def _thread(record: logging.LogRecord) -> str:
    """Firecracker's thread names: the API server thread is fc_api, the rest is main."""
    if record.name == API_LOGGER or record.name.startswith(API_LOGGER + "."):
        return "fc_api"
    name = str(record.threadName)
    # The VMM's work runs on the main thread or, serialised by the VM lock, on API workers;
    # only threads named like Firecracker's (fc_*) show under their own name.
    return name if name.startswith("fc_") else "main"


def _origin(pathname: str) -> str:
    try:
        return str(Path(pathname).resolve().relative_to(_REPO))
    except ValueError:
        return Path(pathname).name


class _SinkHandler(logging.Handler):
    def __init__(self, sink: LineSink, on_miss: Callable[[], None]) -> None:
        super().__init__()
        self.sink = sink
        self.on_miss = on_miss

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a broken format string must not take the VMM down
            self.on_miss()
            return
        if not self.sink.write_line(line):
            self.on_miss()


class _ModuleFilter(logging.Filter):
    """Firecracker's `module` option: keep only records from that module path prefix."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.prefix = module.replace("::", ".")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(self.prefix) or record.module.startswith(self.prefix)


class FcLogger:
    """The process's one logger: configured by --log-path/--level or PUT /logger."""

    def __init__(self) -> None:
        self.instance_id = "anonymous-instance"
        self.on_miss: Callable[[], None] = lambda: None
        self._sink: LineSink | None = None
        self._root = logging.getLogger(ROOT)
        self._root.propagate = False
        self._handler: logging.Handler | None = None
        self.configure(None, "Info", False, False, None)

    def configure(
        self,
        log_path: str | None,
        level: str = "Info",
        show_level: bool = False,
        show_log_origin: bool = False,
        module: str | None = None,
    ) -> None:
        """(Re)point the log; raises SinkError if `log_path` cannot be opened."""
        sink = LineSink(log_path) if log_path else None
        handler: logging.Handler = (
            _SinkHandler(sink, lambda: self.on_miss()) if sink else logging.StreamHandler(sys.stderr)
        )
        handler.setFormatter(FcFormatter(self.instance_id, show_level, show_log_origin))
        if module:
            handler.addFilter(_ModuleFilter(module))
        old_handler, old_sink = self._handler, self._sink
        self._root.addHandler(handler)
        self._root.setLevel(LEVELS[level])
        self._handler, self._sink = handler, sink
        if old_handler is not None:
            self._root.removeHandler(old_handler)
        if old_sink is not None:
            old_sink.close()

    def set_instance_id(self, instance_id: str) -> None:
        self.instance_id = instance_id
        if self._handler is not None and isinstance(self._handler.formatter, FcFormatter):
            self._handler.formatter.instance_id = instance_id

    def close(self) -> None:
        """Detach from Python's logging and close the destination."""
        if self._handler is not None:
            self._handler.flush()
            self._root.removeHandler(self._handler)
            self._handler = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None


LOGGER = FcLogger()


def get(name: str = "") -> logging.Logger:
    """A child of the embervm logger ('api' gives the fc_api thread name)."""
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)

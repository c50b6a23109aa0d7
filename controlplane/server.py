"""Serving the API: uvicorn on a Unix socket that embervm binds (and removes) itself.

Binding the socket here rather than in uvicorn lets a live socket at the path be a clear
error (two VMMs must never share one), lets a stale socket left by a crash be replaced,
and guarantees the path is removed on exit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from controlplane import logger as fclog

log = fclog.get("server")
LISTEN_BACKLOG = 128


class SocketInUseError(OSError):
    """The API socket path is taken; the message says by what."""


def bind_unix_socket(path: str) -> socket.socket:
    """Bind and listen on `path`, refusing a path another process is serving."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise SocketInUseError(errno.EADDRINUSE, f"Failed to open the API socket at {path}: not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens there any more
        else:
            raise SocketInUseError(
                errno.EADDRINUSE, f"Failed to open the API socket at {path}: it is already in use by another process"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except OSError as err:
        sock.close()
        raise SocketInUseError(err.errno, f"Failed to open the API socket at {path}: {err.strerror}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn, except that SIGINT/SIGTERM end `serve` normally instead of being re-raised,
    so the caller still stops the VM, flushes metrics and removes the socket."""

    stop_signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, _frame: FrameType | None) -> None:
            self.force_exit = self.stop_signal is not None  # a second signal: do not wait
            self.stop_signal = signum
            self.should_exit = True

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class ApiServer:
    """One uvicorn server on one Unix socket; `serve` blocks until `stop` or a signal."""

    def __init__(self, app: FastAPI, socket_path: str) -> None:
        self.socket_path = socket_path
        self.sock = bind_unix_socket(socket_path)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=5,
        )
        self.server = _Server(config)

    def serve(self) -> None:
        """Run until stopped; uvicorn handles SIGINT/SIGTERM when run on the main thread.

        The socket already listens, so clients may connect before this is called: their
        connections wait in the backlog.
        """
        log.info('Listening on API socket ("%s").', self.socket_path)
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.close()

    @property
    def stop_signal(self) -> int | None:
        """The signal that ended `serve`, if one did."""
        return self.server.stop_signal

    def stop(self) -> None:
        """Ask the server to finish (thread-safe; returns at once)."""
        self.server.should_exit = True

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


class Periodic:
    """Calls `action` every `interval` seconds on a daemon thread until `stop`."""

    def __init__(self, interval: float, action: Callable[[], object], name: str) -> None:
        self.interval = interval
        self.action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.action()
            except Exception:
                log.exception("Periodic %s failed", self._thread.name)

    def stop(self) -> None:
        self._stop.set()

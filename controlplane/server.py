"""Serving the API: uvicorn on a Unix socket that embervm binds (and removes) itself.

Binding the socket here rather than in uvicorn lets a live socket at the path be a clear
error (two VMMs must never share one), lets a stale socket left by a crash be replaced,
and guarantees the path is removed on exit.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from controlplane import logger as fclog
from controlplane import startup_signals
from controlplane.uds import bind_unix_socket, release_unix_socket

log = fclog.get("server")


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
        startup_signals.take_over(handle)  # one that came while embervm started
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class ApiServer:
    """One uvicorn server on one Unix socket; `serve` blocks until `stop` or a signal."""

    def __init__(self, app: FastAPI, socket_path: str, sock: socket.socket | None = None) -> None:
        """`sock`: the socket `bind_unix_socket(socket_path)` made already (None: bind it now)."""
        self.socket_path = socket_path
        self.sock = sock if sock is not None else bind_unix_socket(socket_path)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            date_header=False,
            headers=[("Server", "Firecracker API")],  # micro_http's, on every response
            timeout_graceful_shutdown=5,
        )
        self.server = _Server(config)

    def serve(self) -> None:
        """Run until stopped; uvicorn handles SIGINT/SIGTERM when run on the main thread.

        The socket already listens, so clients may connect before this is called: their
        connections wait in the backlog.
        """
        log.info('Listening on API socket ("%s").', self.socket_path)
        log.info("API server started.")  # Firecracker's line (the socket already listens)
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
        release_unix_socket(self.sock, self.socket_path)

"""Serving the API: uvicorn on a Unix socket that embervm binds (and removes) itself.

Binding the socket here rather than in uvicorn lets a live socket at the path be a clear
error (two VMMs must never share one), lets a stale socket left by a crash be replaced,
and guarantees the path is removed on exit.
"""

from __future__ import annotations

import asyncio
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
TICK_S = 0.1  # uvicorn's housekeeping period (its date header; its limits)
DRAIN_POLL_S = 0.005  # at a stop: how often to look whether connections and tasks have ended


class _Server(uvicorn.Server):
    """uvicorn, except that:
    - SIGINT/SIGTERM end `serve` normally instead of being re-raised, so the caller still
      stops the VM, flushes metrics and removes the socket;
    - a stop ends it at once: uvicorn notices `should_exit` at its next 0.1 s tick and then
      pauses 0.1 s more while connections close, ~150 ms of every microVM's exit (most of a
      short-lived microVM's life: bench/churn.py)."""

    stop_signal: int | None = None
    _wakeup: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    async def main_loop(self) -> None:
        event = asyncio.Event()
        self._wakeup = (asyncio.get_running_loop(), event)
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await event.wait()

    def wake(self) -> None:
        """Make the loop look at `should_exit` now (any thread, or a signal handler)."""
        if self._wakeup is not None:
            loop, event = self._wakeup
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(event.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's order (stop listening, ask each connection to close, wait for them and
        for the requests under way up to the graceful timeout, then cancel those), looking
        every DRAIN_POLL_S instead of after fixed 0.1 s pauses."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        state = self.server_state
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                while (state.connections or state.tasks) and not self.force_exit:
                    await asyncio.sleep(DRAIN_POLL_S)
        except TimeoutError:
            log.error("Cancelling %d API request(s) still running at the stop", len(state.tasks))
            for task in state.tasks:
                task.cancel(msg="the API server stopped")
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, _frame: FrameType | None) -> None:
            self.force_exit = self.stop_signal is not None  # a second signal: do not wait
            self.stop_signal = signum
            self.should_exit = True
            self.wake()

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
        self.server.wake()

    def close(self) -> None:
        release_unix_socket(self.sock, self.socket_path)

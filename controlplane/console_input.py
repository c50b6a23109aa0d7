"""embervm's stdin as the guest's serial input, as Firecracker's is.

One thread ("console-input") owns the stdin fd. Once a microVM runs, it reads what
arrives, at most `CHUNK` bytes at a time, and hands it to `send_console_input`, which
writes to the console socket of the vCPU worker; that worker takes only what the 8250's
receive FIFO has room for, so a fast writer is held back by the socket (and then by its
own pipe) instead of being buffered without bound. End of file (a closed pipe,
/dev/null) ends the forwarding, not the microVM.

When stdin is a terminal in the foreground, it is put in Firecracker's raw mode (no line
editing, no echo, no signal keys: Ctrl-C goes to the guest) for as long as a microVM
runs, and its attributes are restored on every way out: `close()` (called from the
CLI's `finally`), an `atexit` hook, and SIGTERM/SIGHUP, which restore the terminal and
then end the process as they would have. A terminal whose foreground belongs to another
process group (embervm started with `&`) is left alone and not read: reading or
changing it would stop the process (SIGTTIN/SIGTTOU).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import select
import signal
import termios
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, BinaryIO, Protocol

from controlplane import logger as fclog
from controlplane.state import LauncherLike, MicroVmLike

log = fclog.get("console")

CHUNK = 4096  # the most the forwarding thread holds at once
RESTORING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class ConsoleTarget(Protocol):
    """What the forwarding thread writes to (a running MicroVm)."""

    @property
    def state(self) -> str: ...

    def send_console_input(self, data: bytes) -> None: ...


class RawTerminal:
    """A terminal's attributes, saved when raw mode is entered and put back by `restore`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None
        self._lock = threading.RLock()  # re-entered by a signal handler that interrupts enter_raw

    def enter_raw(self) -> None:
        """Firecracker's raw mode: ICANON, ECHO and ISIG off; a read returns each byte."""
        with self._lock:
            if self._saved is not None:
                return
            self._saved = termios.tcgetattr(self.fd)  # saved first: a restore from now on is right
            raw = termios.tcgetattr(self.fd)
            raw[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG)
            raw[6][termios.VMIN] = 1
            raw[6][termios.VTIME] = 0
            try:
                termios.tcsetattr(self.fd, termios.TCSANOW, raw)
            except BaseException:
                self._saved = None
                raise

    def restore(self) -> None:
        """Put the saved attributes back (idempotent; safe from a signal handler or atexit)."""
        with self._lock:
            saved, self._saved = self._saved, None
            if saved is not None:
                try:
                    termios.tcsetattr(self.fd, termios.TCSANOW, saved)
                except (OSError, termios.error) as err:  # the terminal has gone away (hang-up)
                    log.warning("Cannot restore the terminal's attributes: %s", err)


def _owns_foreground(fd: int) -> bool:
    """True unless `fd` is our controlling terminal and another process group has its foreground."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError as err:
        return err.errno == errno.ENOTTY  # not our controlling terminal: no job control applies


class ConsoleInput:
    """Forwards `fd` (embervm's stdin) to the running microVM's serial port."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.terminal = RawTerminal(fd) if os.isatty(fd) else None
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._previous_handlers: dict[int, Any] = {}
        if self.terminal is not None:
            atexit.register(self.terminal.restore)
            if threading.current_thread() is threading.main_thread():
                for sig in RESTORING_SIGNALS:
                    if signal.getsignal(sig) == signal.SIG_DFL:
                        self._previous_handlers[sig] = signal.signal(sig, self._restore_and_die)

    def _restore_and_die(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM/SIGHUP outside the CLI's own handlers: restore the terminal, then end as
        the signal's default action would."""
        if self.terminal is not None:
            self.terminal.restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def forward_to(self, target: ConsoleTarget) -> None:
        """A microVM runs: enter raw mode (a terminal) and start reading for it. Once only."""
        with self._lock:
            if self._closed or self._thread is not None:
                return
            if self.terminal is not None:
                if not _owns_foreground(self.fd):
                    log.warning("stdin is a terminal of another foreground process group: no serial input")
                    return
                try:
                    self.terminal.enter_raw()
                except (OSError, termios.error) as err:
                    log.warning("Cannot put the terminal in raw mode (%s): input stays line-buffered", err)
            self._thread = threading.Thread(target=self._run, args=(target,), name="console-input", daemon=True)
            self._thread.start()

    def _run(self, target: ConsoleTarget) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.fd, CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:  # EIO: the terminal hung up
                log.info("Serial input ends: cannot read stdin: %s", err)
                return
            if not data:
                log.debug("Serial input ends: end of file on stdin; the microVM keeps running")
                return
            if target.state == "Exited":
                return
            target.send_console_input(data)  # blocks while the guest is not reading

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread, restore the terminal and the signal handlers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            # It may still be in send_console_input if the guest stopped reading; that ends
            # when the vCPU worker does, and the thread is a daemon.
            self._thread.join(timeout)
        if self.terminal is not None:
            self.terminal.restore()
            atexit.unregister(self.terminal.restore)
        for sig, handler in self._previous_handlers.items():
            if signal.getsignal(sig) == self._restore_and_die:
                signal.signal(sig, handler)
        if self._thread is None or not self._thread.is_alive():
            for fd in (self._stop_r, self._stop_w):
                os.close(fd)


class ForwardingLauncher:
    """A launcher whose microVMs get embervm's stdin as serial input once they run."""

    def __init__(self, launcher: LauncherLike, console: ConsoleInput) -> None:
        self._launcher = launcher
        self._console = console

    def start_vm(self, spec: Any, console_out: BinaryIO, on_exit: Callable[[int, str], None]) -> MicroVmLike:
        vm = self._launcher.start_vm(spec, console_out, on_exit)
        self._console.forward_to(vm)
        return vm

    def restore_vm(self, prepared: Any, console_out: BinaryIO, on_exit: Callable[[int, str], None]) -> MicroVmLike:
        """A microVM from a snapshot (controlplane.snapshot), with the same console input."""
        vm: MicroVmLike = self._launcher.restore_vm(prepared, console_out, on_exit)  # type: ignore[attr-defined]
        self._console.forward_to(vm)
        return vm

"""Supervisor side of a running microVM: its worker processes and their channels.

`Launcher` owns the worker zygote (forked before any thread exists) and a private run
directory for ZeroMQ endpoints. `Launcher.start_vm` lays out guest memory
(`controlplane.builder`), forks the vCPU worker and returns a `MicroVm`, whose monitor
thread is the only user of the control socket: it forwards console output, applies
worker messages and notices a worker's death at once through its pidfd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

import zmq

from controlplane.builder import build_guest
from controlplane.vm_spec import VmSpec
from controlplane.zygote import Zygote, ZygoteError
from shared import exitcodes
from shared import protocol as p
from shared.boot.errors import BootError
from shared.kvm import Kvm, KvmError, open_kvm

log = logging.getLogger("embervm.microvm")

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0

ExitCallback = Callable[[int, str], None]


class VmStartError(Exception):
    """The microVM could not start; the message is fit for an API `fault_message`."""


def describe_wait_status(status: int) -> tuple[int, str]:
    """(microVM exit code, human reason) for a worker's raw wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        code = exitcodes.BAD_SYSCALL if sig == signal.SIGSYS else exitcodes.GENERIC_ERROR
        return code, f"killed by signal {name}"
    return os.WEXITSTATUS(status), f"exited with status {os.WEXITSTATUS(status)}"


class Launcher:
    """Forks workers for microVMs. Create it first thing in `main()`."""

    def __init__(self, zygote: Zygote, run_dir: str) -> None:
        self.zygote = zygote
        self.run_dir = run_dir
        self._count = 0

    @classmethod
    def start(cls) -> Launcher:
        zygote = Zygote.start()
        run_dir = tempfile.mkdtemp(prefix="embervm-")
        return cls(zygote, run_dir)

    def start_vm(self, spec: VmSpec, console_out: BinaryIO, on_exit: ExitCallback) -> MicroVm:
        """Build guest memory, spawn the vCPU worker, wait until the guest runs."""
        self._count += 1
        try:
            kvm_fd = open_kvm()
        except KvmError as e:
            raise VmStartError(str(e)) from None
        try:
            Kvm(kvm_fd).check()
            plan = build_guest(spec)
        except (KvmError, BootError, OSError, ValueError) as e:
            os.close(kvm_fd)
            raise VmStartError(str(e)) from None
        vm = MicroVm(self, spec, console_out, on_exit, f"ipc://{self.run_dir}/vm{self._count}-ctl")
        try:
            vm._spawn_vcpu_worker(kvm_fd, plan.memfd, plan.vcpu_args)
        finally:
            os.close(kvm_fd)
            os.close(plan.memfd)
        vm.cmdline = plan.cmdline
        return vm

    def shutdown(self) -> None:
        self.zygote.shutdown()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class MicroVm:
    """A running microVM as the supervisor sees it."""

    def __init__(
        self, launcher: Launcher, spec: VmSpec, console_out: BinaryIO, on_exit: ExitCallback, endpoint: str
    ) -> None:
        self.launcher = launcher
        self.spec = spec
        self.cmdline = ""
        self.state = "Starting"
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.exit_detail = ""  # evidence for a failed guest, e.g. a register dump
        self._console_out = console_out
        self._on_exit = on_exit
        self._endpoint = endpoint
        self._ctx = zmq.Context()
        self._ctl = self._ctx.socket(zmq.ROUTER)
        self._ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._ctl.setsockopt(zmq.LINGER, 0)
        self._ctl.bind(endpoint)
        self._cond = threading.Condition()
        self._commands: queue.SimpleQueue[p.Message] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._metrics: dict[str, dict[str, int]] = {}
        self._metrics_seq = 0
        self._worker_pid = 0
        self._worker_alive = False
        self._pidfd = -1
        self._console: socket.socket | None = None
        self._thread = threading.Thread(target=self._monitor, name="vm-monitor", daemon=True)

    # --- start-up -------------------------------------------------------------------------
    def _spawn_vcpu_worker(self, kvm_fd: int, memfd: int, vcpu_args: dict[str, object]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._console = mine
        args = {**vcpu_args, "control_endpoint": self._endpoint, "name": "vcpu"}
        try:
            self._worker_pid = self.launcher.zygote.spawn("vcpu", "vcpu", args, [kvm_fd, memfd, theirs.fileno()])
        except (ZygoteError, OSError) as e:
            self._close()
            raise VmStartError(f"cannot start the vCPU worker: {e}") from None
        finally:
            theirs.close()
        self._worker_alive = True
        self._pidfd = os.pidfd_open(self._worker_pid)
        first = self._await_first_message()
        if not isinstance(first, p.Ready):
            reason = first.reason if isinstance(first, p.Exited) else "the vCPU worker did not start"
            self._reap_worker()
            self._close()
            raise VmStartError(reason)
        self.state = "Running"
        self._thread.start()

    def _await_first_message(self) -> p.Message | None:
        poller = zmq.Poller()
        poller.register(self._ctl, zmq.POLLIN)
        poller.register(self._pidfd, zmq.POLLIN)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(timeout=remaining * 1000))
            if self._ctl in events:
                msg = self._recv()
                if isinstance(msg, p.Log):
                    log.warning("vcpu worker: %s", msg.text)
                    continue
                return msg
            if self._pidfd in events:
                return None
        return None

    # --- the API's verbs ------------------------------------------------------------------------
    def pause(self) -> None:
        self._command_and_wait(p.Pause(), lambda: self.state in ("Paused", "Exited"))

    def resume(self) -> None:
        self._command_and_wait(p.Resume(), lambda: self.state in ("Running", "Exited"))

    def send_ctrl_alt_del(self) -> None:
        self._command(p.CtrlAltDel())

    def send_console_input(self, data: bytes) -> None:
        if self._console is not None and self.state != "Exited":
            with contextlib.suppress(OSError):
                self._console.sendall(data)

    def metrics(self) -> dict[str, dict[str, int]]:
        """The workers' cumulative counters, refreshed from the workers if they answer in time."""
        with self._cond:
            seq = self._metrics_seq
        if self.state != "Exited":
            self._command(p.FlushMetrics())
            with self._cond:
                self._cond.wait_for(lambda: self._metrics_seq > seq or self.state == "Exited", timeout=1.0)
        with self._cond:
            return {group: dict(values) for group, values in self._metrics.items()}

    def workers(self) -> list[dict[str, object]]:
        return [{"name": "vcpu", "pid": self._worker_pid, "alive": self._worker_alive, "exit_reason": self.exit_reason}]

    def stop(self) -> None:
        """Stop the guest and its workers (idempotent)."""
        if self.state != "Exited":
            self._command(p.Stop())
            if self.wait(STOP_TIMEOUT_S) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._worker_pid, signal.SIGKILL)
                self.wait(STOP_TIMEOUT_S)

    def wait(self, timeout: float | None = None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: self.state == "Exited", timeout=timeout)
            return self.exit_code

    # --- monitor thread ---------------------------------------------------------------------------
    def _command(self, msg: p.Message) -> None:
        self._commands.put(msg)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"c")

    def _command_and_wait(self, msg: p.Message, done: Callable[[], bool]) -> None:
        self._command(msg)
        with self._cond:
            if not self._cond.wait_for(done, timeout=STOP_TIMEOUT_S):
                raise TimeoutError(f"the vCPU worker did not answer {msg.TYPE!r}")

    def _recv(self) -> p.Message | None:
        identity, payload = self._ctl.recv_multipart()
        try:
            return p.decode(payload)
        except p.ProtocolError as e:
            log.error("bad message from worker %r: %s", identity, e)
            return None

    def _monitor(self) -> None:
        poller = zmq.Poller()
        poller.register(self._ctl, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self._pidfd, zmq.POLLIN)
        assert self._console is not None
        poller.register(self._console.fileno(), zmq.POLLIN)
        outcome: tuple[int, str] | None = None
        while outcome is None:
            events = dict(poller.poll())
            if self._console.fileno() in events:
                self._pump_console()
            if self._wake_r in events:
                self._send_commands()
            if self._ctl in events:
                outcome = self._apply(self._recv())
            if outcome is None and self._pidfd in events:
                self._pump_console()
                while self._ctl.poll(0):  # messages sent just before the exit
                    outcome = self._apply(self._recv()) or outcome
                if outcome is None:
                    status = self._reap_worker()
                    code, how = describe_wait_status(status) if status is not None else (1, "vanished")
                    outcome = (code, f"vCPU worker {how}")
        self._reap_worker()
        self._pump_console()
        self._finish(*outcome)

    def _pump_console(self) -> None:
        assert self._console is not None
        while select.select([self._console], [], [], 0)[0]:
            try:
                data = self._console.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                self._console_out.write(data)
                self._console_out.flush()
            except (OSError, ValueError):
                pass  # the console reader went away; the guest keeps running

    def _send_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 256):
                pass
        while not self._commands.empty():
            msg = self._commands.get()
            try:
                self._ctl.send_multipart([b"vcpu", p.encode(msg)])
            except zmq.ZMQError as e:
                log.error("cannot send %s to the vCPU worker: %s", msg.TYPE, e)

    def _apply(self, msg: p.Message | None) -> tuple[int, str] | None:
        with self._cond:
            if isinstance(msg, p.StateChanged):
                self.state = msg.state
            elif isinstance(msg, p.Metrics):
                self._metrics = msg.groups
                self._metrics_seq += 1
            elif isinstance(msg, p.Log):
                getattr(log, msg.level if msg.level in ("warning", "error", "info") else "info")(
                    "vcpu worker: %s", msg.text
                )
            elif isinstance(msg, p.Exited):
                if msg.detail:
                    log.error("%s\n%s", msg.reason, msg.detail)
                    self.exit_detail = msg.detail
                return msg.code, msg.reason
            self._cond.notify_all()
        return None

    def _reap_worker(self) -> int | None:
        status = self.launcher.zygote.wait_exit(self._worker_pid, STOP_TIMEOUT_S)
        self._worker_alive = False
        return status

    def _finish(self, code: int, reason: str) -> None:
        with self._cond:
            self.exit_code, self.exit_reason = code, reason
            self.state = "Exited"
            self._cond.notify_all()
        self._close()
        try:
            self._on_exit(code, reason)
        except Exception:
            log.exception("on_exit callback failed")

    def _close(self) -> None:
        self._ctl.close(linger=0)
        self._ctx.term()
        for fd in (self._wake_r, self._wake_w, self._pidfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = -1
        if self._console is not None:
            self._console.close()


def run_until_exit(spec: VmSpec, console_out: BinaryIO | None = None) -> tuple[int, str]:
    """Boot `spec` and block until the guest ends; for `--no-api` and tests."""
    launcher = Launcher.start()
    try:
        vm = launcher.start_vm(spec, console_out or sys.stdout.buffer, lambda code, reason: None)
        vm.wait()
        return vm.exit_code if vm.exit_code is not None else exitcodes.GENERIC_ERROR, vm.exit_reason or ""
    finally:
        launcher.shutdown()

"""A real `MicroVm` monitor over fake workers: no KVM, no zygote, no guest.

`FakeZygote.spawn` starts a real process (`sleep`, so the supervisor has a pid and a pidfd
to watch) and a `FakeWorker` thread that speaks the control protocol as that worker: it
connects to the microVM's ROUTER under the worker's name, says Ready, sends heartbeats, and
answers commands and updates. A test makes it misbehave (`send_raw`, `send`), kills its
process (`kill`), or holds a spawn (`FakeZygote.hold`) to run something while the monitor
thread is inside it.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import zmq

from controlplane.builder import DevicePlan
from controlplane.microvm import MicroVm
from controlplane.vm_spec import DriveSpec, VmSpec
from devices.vsock.messages import VsockTransportReset
from shared import fdpass
from shared import protocol as p
from shared.device_kinds import DEVICE_KINDS
from shared.spawn import DeviceSpawn, VcpuSpawn

HEARTBEAT_S = 0.05
UPDATES = (p.UpdateRateLimiter, p.UpdateNetRateLimiters, VsockTransportReset)


def wait_until(check: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def fd_identity(fd: int) -> tuple[int, int] | None:
    """(device, inode) of an open fd, None when it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class FakeWorker(threading.Thread):
    """One worker's control side, in a thread of the test process."""

    def __init__(self, ctx: zmq.Context, kind: str, name: str, args: dict[str, Any], fd_channel: int | None) -> None:
        super().__init__(name=f"fake-{name}", daemon=True)
        self.kind, self.name, self.args = kind, name, args
        self.process = subprocess.Popen(["sleep", "3600"])
        self.pid = self.process.pid
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(args["control_endpoint"])
        self.fd_channel = socket.socket(fileno=fd_channel) if fd_channel is not None else None
        self.console: socket.socket | None = None  # the vCPU worker's end of the console
        self.received: list[p.Message] = []
        self.received_fds: list[tuple[p.Message, tuple[int, int] | None]] = []
        self.metrics: dict[str, dict[str, int]] = {}
        self.answer_updates = True
        self.die_after_answer = False  # crash right after answering an update
        self.ready = True  # say Ready at once
        self.die_after_ready = False  # and then die
        self._outbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._halt = threading.Event()

    # --- what a test makes it do -----------------------------------------------------------
    def send(self, msg: p.Message) -> None:
        self._outbox.put([p.encode(msg)])

    def send_raw(self, frames: list[bytes]) -> None:
        self._outbox.put(frames)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def got(self, kind: type[p.Message]) -> list[Any]:
        return [m for m in list(self.received) if isinstance(m, kind)]

    # --- the worker's loop -----------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.fd_channel is not None:
            poller.register(self.fd_channel.fileno(), zmq.POLLIN)
        if self.ready:
            self._send(p.Ready(self.pid))
            if self.die_after_ready:
                time.sleep(0.05)  # the Ready reaches the supervisor before the death
                self.kill()
        next_beat = 0.0
        while not self._halt.is_set() and self.alive:
            while not self._outbox.empty():
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.send_multipart(self._outbox.get(), zmq.NOBLOCK)
            if self.kind != "vcpu" and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + HEARTBEAT_S
                self._send(p.Heartbeat())
            events = dict(poller.poll(10))
            if self.sock in events:
                self._on_control(p.decode(self.sock.recv()))
            if self.fd_channel is not None and self.fd_channel.fileno() in events:
                self._on_fds()
        self.sock.close(linger=0)
        if self.fd_channel is not None:
            self.fd_channel.close()

    def _send(self, msg: p.Message) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send(p.encode(msg), zmq.NOBLOCK)

    def _on_control(self, msg: p.Message) -> None:
        self.received.append(msg)
        if isinstance(msg, p.Stop):
            if self.kind == "vcpu":
                self._send(p.Exited(0, "stopped by the supervisor", ""))
            self.process.terminate()
        elif isinstance(msg, p.FlushMetrics):
            self._send(p.Metrics(self.metrics))
        elif isinstance(msg, p.Pause | p.Resume):
            self._send(p.StateChanged("Paused" if isinstance(msg, p.Pause) else "Running"))
        elif isinstance(msg, UPDATES) and self.answer_updates:
            self._send(p.UpdateResult(msg.request_id, True, ""))

    def _on_fds(self) -> None:
        assert self.fd_channel is not None
        try:
            received = fdpass.recv_message(self.fd_channel)
        except (BlockingIOError, fdpass.FdChannelError):
            return
        if received is None:
            self._halt.set()
            return
        msg, fds = received
        self.received.append(msg)
        self.received_fds.append((msg, fd_identity(fds[0]) if fds else None))
        for fd in fds:
            os.close(fd)
        if isinstance(msg, p.ReplaceBackingFile) and self.answer_updates:
            self._send(p.UpdateResult(msg.request_id, True, ""))
            if self.die_after_answer:
                self.kill()

    def stop(self) -> None:
        self._halt.set()
        self.kill()
        self.join(timeout=5)
        self.process.wait(timeout=5)
        if self.console is not None:
            self.console.close()


@dataclass
class SpawnRecord:
    kind: str
    name: str
    args: dict[str, Any]
    fds: list[int]
    at_entry: list[tuple[int, int] | None]  # what each fd was when spawn was called
    at_exit: list[tuple[int, int] | None] = field(default_factory=list)  # ... and when it returned


class FakeZygote:
    """Stands in for controlplane.zygote.Zygote."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.workers: list[FakeWorker] = []
        self.spawns: list[SpawnRecord] = []
        self.hold: Callable[[SpawnRecord], None] | None = None  # runs inside spawn, before it returns
        self.fail_next = False
        self.configure: Callable[[FakeWorker], None] | None = None  # before the worker starts
        self.spawned: Callable[[FakeZygote], None] | None = None  # after each spawn, before it returns

    def spawn(
        self,
        kind: str,
        name: str,
        args: dict[str, Any],
        fds: list[int],
        *,
        namespaces: bool = True,
        stderr_fd: int | None = None,
    ) -> int:
        record = SpawnRecord(kind, name, args, list(fds), [fd_identity(fd) for fd in fds])
        self.spawns.append(record)
        if self.hold is not None:
            self.hold(record)
        record.at_exit = [fd_identity(fd) for fd in fds]
        channel = None
        if kind != "vcpu":  # a device worker: its fd channel, by the production spawn contract
            channel = os.dup(DeviceSpawn.from_zygote(DEVICE_KINDS[kind], args, fds).fd_channel)
        worker = FakeWorker(self.ctx, kind, name, args, channel)
        if kind == "vcpu":
            worker.console = socket.socket(fileno=os.dup(VcpuSpawn.from_zygote(args, fds).console))
        if self.configure is not None:
            self.configure(worker)
        self.workers.append(worker)
        worker.start()
        if self.spawned is not None:
            self.spawned(self)
        return worker.pid

    def worker(self, name: str) -> FakeWorker:
        """The newest worker called `name`."""
        return [w for w in self.workers if w.name == name][-1]

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        worker = next(w for w in self.workers if w.pid == pid)
        try:
            code = worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        worker.join(timeout=5)  # a dead process's sockets are closed
        return -code if code < 0 else code << 8  # a raw wait status

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.ctx.term()


class FakeKills:
    def describe(self, pid: int) -> str:
        return "no record"


@dataclass
class FakeVm:
    vm: MicroVm
    zygote: FakeZygote
    exits: list[tuple[int, str]]
    log: io.StringIO
    disk: str

    def worker(self, name: str) -> FakeWorker:
        return self.zygote.worker(name)

    def replaced(self, name: str, old_pid: int, timeout: float = 10.0) -> FakeWorker:
        """Wait until `name` has a live worker other than `old_pid` that the monitor watches."""
        wait_until(
            lambda: (
                any(
                    w["name"] == name and w["pid"] != old_pid and w["alive"] and not w.get("broken")
                    for w in self.vm.workers()
                )
                and self.vm._sup.workers[name.encode()].pidfd in self.vm._watch.pidfds
            ),
            timeout,
            f"a new {name} worker",
        )
        return self.worker(name)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


@contextlib.contextmanager
def fake_vm(
    *,
    net_mmds: bool = False,
    restart_policy: dict[str, Any] | None = None,
    configure: Callable[[FakeWorker], None] | None = None,
    monitor: bool = True,
    settle_s: float = 0.0,
    zygote: FakeZygote | None = None,
    vcpu_args: dict[str, Any] | None = None,
) -> Iterator[FakeVm]:
    """A running MicroVm with a vCPU worker and a block worker for drive `rootfs` (and a net
    worker `net_eth0` serving MMDS), all fake. With `monitor=False` the monitor thread starts
    only at the end: the test calls the monitor's steps itself; `settle_s` gives that late
    monitor time to end the microVM by itself before it is stopped. A test that passes its
    own `zygote` can look at its workers after a failed start (then shuts it down itself)."""
    tmp = tempfile.mkdtemp(prefix="ev-")  # ipc:// paths must stay short
    disk = Path(tmp, "disk")
    disk.write_bytes(b"\0" * 4096)
    drive = DriveSpec("rootfs", str(disk), is_root_device=True)
    spec = VmSpec(kernel_image_path="/nonexistent", drives=[drive], restart_policy=restart_policy)
    own_zygote = zygote is None
    zygote = zygote or FakeZygote()
    zygote.configure = configure or zygote.configure
    launcher = SimpleNamespace(zygote=zygote, seccomp_kills=FakeKills())
    exits: list[tuple[int, str]] = []
    devices = [DevicePlan("block", "rootfs", {"drive_id": "rootfs"}, [os.open(disk, os.O_RDWR)], drive)]
    if net_mmds:
        mmds = {"version": "V2", "document": b""}
        devices.append(DevicePlan("net", "eth0", {"iface_id": "eth0", "mmds": mmds}, [_eventfd()]))
    for device in devices:
        device.queue_fds = [_eventfd() for _ in range(device.num_queues)]
        device.irqfd = _eventfd()
    memfd = os.memfd_create("fake-guest-memory")
    kvm_fd = _eventfd()
    logged = io.StringIO()
    handler = _capture("embervm", logged)
    vm = MicroVm(launcher, spec, io.BytesIO(), lambda code, reason: exits.append((code, reason)), f"{tmp}/vm")  # type: ignore[arg-type]
    if not monitor:
        vm._thread = threading.Thread(target=lambda: None)
    try:
        vm._start(kvm_fd, SimpleNamespace(memfd=memfd, vcpu_args=vcpu_args or {}, cmdline="", fill=None), devices)  # type: ignore[arg-type]
    except BaseException:
        if own_zygote:
            zygote.shutdown()
        handler()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for fd in (kvm_fd, memfd):
            os.close(fd)
        for device in devices:
            device.close()
    try:
        yield FakeVm(vm, zygote, exits, logged, str(disk))
    finally:
        if not monitor:
            vm._thread = threading.Thread(target=vm._run, name="vm-monitor", daemon=True)
            vm._thread.start()
            vm.wait(settle_s)
        vm.stop()
        zygote.shutdown()
        handler()
        shutil.rmtree(tmp, ignore_errors=True)


def _capture(logger: str, into: io.StringIO) -> Callable[[], None]:
    """Copy `logger`'s records (formatted as `%(message)s`) into `into`; returns the undo."""
    import logging

    handler = logging.StreamHandler(into)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    target = logging.getLogger(logger)
    target.addHandler(handler)
    return lambda: target.removeHandler(handler)

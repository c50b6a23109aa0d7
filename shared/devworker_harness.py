"""The supervisor's side of one real device-worker process, for tests and benchmarks.

`WorkerHarness` does what `controlplane.microvm` does for a device, minus the vCPU: it
creates guest memory, the irqfd, one eventfd per queue of its kind (`shared.device_kinds`),
the register page (`regs`: the vCPU worker's view of it) and the fd channel, spawns the
worker through a zygote with the production spawn contract (`shared.spawn.DeviceSpawn`),
holds the ZeroMQ control socket and an MMIO client.
Device harnesses (`devices/<kind>/testing.py`) add the guest's side on top: MockDriver
chains in the shared memfd, queue kicks, the irqfd.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from typing import Any, Protocol

import zmq

from shared import fdpass
from shared import protocol as p
from shared.device_kinds import DEVICE_KINDS
from shared.devworker_client import MmioClient
from shared.devworker_client import channel_pair as mmio_channel_pair
from shared.memory import GuestMemory, create_guest_memfd
from shared.spawn import DeviceSpawn
from shared.virtio.regpage import VcpuRegisters, create_regpage_memfd


class Spawner(Protocol):
    """The zygote's interface, as far as a harness needs it."""

    def spawn(
        self, kind: str, name: str, args: dict[str, Any], fds: list[int], *, stderr_fd: int | None = None
    ) -> int: ...
    def wait_exit(self, pid: int, timeout: float) -> int | None: ...


def proc_state(pid: int) -> str:
    """The one-letter state of `pid` from /proc ("Z" when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


class WorkerHarness:
    """One device worker of `kind`; the backend fds are closed here once passed."""

    def __init__(
        self,
        zygote: Spawner,
        kind: str,
        name: str,
        endpoint: str,
        *,
        mem_size: int,
        args: dict[str, Any],
        backend_fds: list[int],
    ) -> None:
        self.zygote = zygote
        self.kind = kind
        self.name = name
        self.logs: list[str] = []
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(f"{endpoint}-ctl")
        self.memfd = create_guest_memfd(mem_size)
        self.mem = GuestMemory.map(self.memfd, mem_size)
        self.irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        device_kind = DEVICE_KINDS[kind]
        self.queue_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(device_kind.num_queues)]
        self.fd_channel, theirs = fdpass.channel_pair()
        full_args = {
            **args,
            "mem_size": mem_size,
            "name": name,
            "control_endpoint": f"{endpoint}-ctl",
        }
        mmio_mine, mmio_theirs = mmio_channel_pair()
        self.mmio = MmioClient(mmio_mine, timeout_s=5.0, name=name)
        self.regs_fd = create_regpage_memfd(name)
        self.regs = VcpuRegisters(self.regs_fd)  # the vCPU worker's view of the register page
        self._stderr, stderr_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # what the worker writes to fd 2
        try:
            spawn = DeviceSpawn(
                device_kind,
                memfd=self.memfd,
                irqfd=self.irqfd,
                queue_fds=self.queue_fds,
                backend_fds=backend_fds,
                fd_channel=theirs.fileno(),
                mmio_channel=mmio_theirs.fileno(),
                args=full_args,
                regs_fd=self.regs_fd,
            )
            self.pid = zygote.spawn(kind, name, *spawn.to_zygote(), stderr_fd=stderr_w)
        finally:
            for fd in backend_fds:
                os.close(fd)
            theirs.close()
            mmio_theirs.close()
            os.close(stderr_w)
        self.ready = self.expect(p.Ready)

    # --- the guest's side: notifications ---------------------------------------------------
    def kick(self, index: int = 0) -> None:
        """What KVM does when the guest writes QueueNotify for queue `index`."""
        os.eventfd_write(self.queue_fds[index], 1)

    def wait_interrupt(self, timeout: float = 5.0) -> bool:
        """True once the worker wrote the irqfd (the counter is consumed)."""
        if not select.select([self.irqfd], [], [], timeout)[0]:
            return False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.irqfd)
        return True

    # --- the supervisor's side -----------------------------------------------------------------
    def send_control(self, msg: p.Message) -> None:
        self.control.send_multipart([self.name.encode(), p.encode(msg)])

    def expect(self, kind: type[p.Message], timeout: float = 5.0) -> Any:
        """The next message of type `kind` from the worker (logs are kept in `logs`)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.control.poll(int(remaining * 1000) + 1):
                break
            _, payload = self.control.recv_multipart()
            try:
                msg = p.decode(payload)
            except p.ProtocolError:
                continue
            if self.answer(msg):
                continue
            if isinstance(msg, p.Log):
                self.logs.append(msg.text)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, p.Exited) and kind is not p.Exited:
                raise RuntimeError(f"the {self.kind} worker exited: {msg.reason}\n{msg.detail}")
        raise TimeoutError(f"no {kind.__name__} from the {self.kind} worker within {timeout} s")

    def stderr(self) -> str:
        """What the worker wrote to its stderr so far (its own log records, tracebacks)."""
        chunks = []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._stderr, 65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def answer(self, msg: p.Message) -> bool:
        """A request the supervisor answers by itself (a device kind's harness overrides
        this); True when `msg` was one and is dealt with."""
        return False

    def serve(self, timeout: float) -> bool:
        """Wait up to `timeout` s for an interrupt, answering the worker's requests
        meanwhile (`answer`); True once the worker wrote the irqfd."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.irqfd, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(int(remaining * 1000) + 1))
            while self.control.poll(0):
                _, payload = self.control.recv_multipart()
                with contextlib.suppress(p.ProtocolError):
                    self.answer(p.decode(payload))
            if self.irqfd in events:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.irqfd)
                return True
        return False

    def metric_groups(self) -> dict[str, dict[str, int]]:
        self.send_control(p.FlushMetrics())
        groups: dict[str, dict[str, int]] = self.expect(p.Metrics).groups
        return groups

    def alive(self) -> bool:
        return os.path.exists(f"/proc/{self.pid}") and "Z" not in proc_state(self.pid)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Ask the worker to stop; its raw wait status (None if it had to be killed)."""
        self.send_control(p.Stop())
        status = self.zygote.wait_exit(self.pid, timeout)
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
            self.zygote.wait_exit(self.pid, timeout)
        return status

    def close(self) -> None:
        if self.alive():
            self.stop()
        self.mmio.close()
        self.control.close(linger=0)
        self.ctx.term()
        self.fd_channel.close()
        os.close(self._stderr)
        self.mem.close()
        self.regs.close()
        for fd in (self.memfd, self.irqfd, self.regs_fd, *self.queue_fds):
            os.close(fd)

    def __enter__(self) -> WorkerHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

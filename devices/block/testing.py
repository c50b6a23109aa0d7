"""Drive a real block worker process from the host, with no vCPU: for tests and benchmarks.

`BlockWorkerHarness` plays both of the worker's peers. As the supervisor it creates guest
memory, the eventfds and the fd channel, spawns the worker through a zygote and holds the
ZeroMQ control socket. As the guest it sets the device up over the MMIO channel (the
same messages a vCPU thread sends), builds chains with `MockDriver` in the shared memfd,
kicks the queue's ioeventfd and waits on the irqfd. So everything between "guest wrote
QueueNotify" and "the GSI fired" is the production path.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Sequence
from typing import Any, Protocol

import zmq

from devices.block.request import HEADER, RequestType
from shared import fdpass
from shared import protocol as p
from shared.devworker_client import MmioClient
from shared.layout import MiB
from shared.memory import GuestMemory, create_guest_memfd
from shared.virtio import constants as c
from shared.virtio.testing import MockDriver, mmio_setup

FEATURES = c.feature(c.VIRTIO_F_VERSION_1)


class Spawner(Protocol):
    """The zygote's interface, as far as the harness needs it."""

    def spawn(self, kind: str, name: str, args: dict[str, Any], fds: list[int]) -> int: ...
    def wait_exit(self, pid: int, timeout: float) -> int | None: ...


def header(kind: int, sector: int = 0) -> bytes:
    return HEADER.pack(kind, 0, sector)


class BlockWorkerHarness:
    """One block worker over `disk`, with the guest and supervisor sides played here."""

    def __init__(
        self,
        zygote: Spawner,
        run_dir: str,
        disk: str,
        *,
        drive_id: str = "vda",
        read_only: bool = False,
        cache_type: str = "Unsafe",
        rate_limiter: dict[str, Any] | None = None,
        mem_size: int = 32 * MiB,
        queue_size: int = 256,
    ) -> None:
        self.zygote = zygote
        self.name = f"block_{drive_id}"
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(f"ipc://{run_dir}/{self.name}-ctl")
        self.mmio_endpoint = f"ipc://{run_dir}/{self.name}-mmio"
        self.logs: list[str] = []
        self.memfd = create_guest_memfd(mem_size)
        self.mem = GuestMemory.map(self.memfd, mem_size)
        self.irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.queue_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fd_channel, theirs = fdpass.channel_pair()
        backing = os.open(disk, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        args = {
            "drive_id": drive_id,
            "mem_size": mem_size,
            "read_only": read_only,
            "cache_type": cache_type,
            "rate_limiter": rate_limiter,
            "name": self.name,
            "control_endpoint": f"ipc://{run_dir}/{self.name}-ctl",
            "mmio_endpoint": self.mmio_endpoint,
        }
        try:
            fds = [self.memfd, self.irqfd, self.queue_fd, backing, theirs.fileno()]
            self.pid = zygote.spawn("block", self.name, args, fds)
        finally:
            os.close(backing)
            theirs.close()
        self.ready = self.expect(p.Ready)
        self.mmio = MmioClient(self.ctx, self.mmio_endpoint, timeout_s=5.0)
        self.driver = MockDriver(self.mem, size=queue_size, data_size=16 * MiB)

    # --- the guest's side ------------------------------------------------------------------

    def setup(self, features: int = FEATURES, drivers: Sequence[MockDriver] | None = None) -> int:
        """The virtio init sequence over the MMIO channel; returns the device status."""
        return mmio_setup(self.mmio, list(drivers or [self.driver]), features)  # type: ignore[arg-type]

    def kick(self) -> None:
        os.eventfd_write(self.queue_fd, 1)

    def wait_interrupt(self, timeout: float = 5.0) -> bool:
        """True once the worker wrote the irqfd (the counter is consumed)."""
        if not select.select([self.irqfd], [], [], timeout)[0]:
            return False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.irqfd)
        return True

    def wait_used(self, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        """The next `count` used entries, waiting on the irqfd between looks."""
        deadline = time.monotonic() + timeout
        entries: list[tuple[int, int]] = []
        while True:
            entries += self.driver.used()
            if len(entries) >= count:
                return entries
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_interrupt(remaining):
                raise TimeoutError(f"{len(entries)} of {count} requests completed within {timeout} s")

    def add_read(self, sector: int, length: int) -> int:
        return self.driver.add_chain([header(RequestType.IN, sector)], [length, 1])

    def add_write(self, sector: int, data: bytes) -> int:
        return self.driver.add_chain([header(RequestType.OUT, sector), data], [1])

    def status_of(self, head: int) -> int:
        return self.driver.written(head)[-1][-1]

    def submit(self, *heads: int) -> list[tuple[int, int]]:
        """Kick for already published chains and wait until they are all used."""
        self.kick()
        return self.wait_used(len(heads))

    # --- the supervisor's side ---------------------------------------------------------------

    def send(self, msg: p.Message) -> None:
        self.control.send_multipart([self.name.encode(), p.encode(msg)])

    def expect(self, kind: type[p.Message], timeout: float = 5.0) -> Any:
        """The next message of type `kind` from the worker (logs are kept in `logs`)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.control.poll(int(remaining * 1000) + 1):
                break
            _, payload = self.control.recv_multipart()
            msg = p.decode(payload)
            if isinstance(msg, p.Log):
                self.logs.append(msg.text)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, p.Exited) and kind is not p.Exited:
                raise RuntimeError(f"the block worker exited: {msg.reason}\n{msg.detail}")
        raise TimeoutError(f"no {kind.__name__} from the block worker within {timeout} s")

    def metrics(self) -> dict[str, int]:
        self.send(p.FlushMetrics())
        groups: dict[str, dict[str, int]] = self.expect(p.Metrics).groups
        return groups[self.name]

    def replace_backing_file(self, fd: int, request_id: int = 1) -> p.UpdateResult:
        fdpass.send_message(self.fd_channel, p.ReplaceBackingFile(request_id), [fd])
        result: p.UpdateResult = self.expect(p.UpdateResult)
        return result

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return os.path.exists(f"/proc/{self.pid}") and "Z" not in _proc_state(self.pid)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Ask the worker to stop; its raw wait status (None if it had to be killed)."""
        self.send(p.Stop())
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
        self.mem.close()
        for fd in (self.memfd, self.irqfd, self.queue_fd):
            os.close(fd)

    def __enter__(self) -> BlockWorkerHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"

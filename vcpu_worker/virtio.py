"""virtio-mmio devices as the vCPU worker sees them: a window forwarded to a device worker.

For each device the supervisor passes (window base, GSI, MMIO endpoint) and eventfds it
created: one per queue and the irqfd. This process created the VM, so it is the one that
can register them with KVM: a guest write of queue index i to QueueNotify signals queue
i's eventfd inside KVM (no exit), and a write to the irqfd injects the GSI. Every other
access to the window exits to a vCPU thread and is forwarded, synchronously, to the
device worker (`RemoteMmioDevice`).

A device worker that does not answer must not hang the guest: the access times out
(reads see all-ones, as for a missing device), it is reported, and for the next
`RETRY_AFTER_S` the window answers at once instead of waiting again. When the supervisor
sees a device worker die (its pidfd) it says so (`DeviceDown`), and from then on the
window answers at once without trying. When it is going to replace the worker it says
`DeviceRestarting` instead: accesses to the window wait (up to `RESTART_WAIT_S`) rather
than read all-ones, and an access the dead worker never answered is abandoned and sent
again; `DeviceUp` (the replacement is bound to the same endpoint) releases them, each
vCPU thread on a fresh socket, so a request queued for the dead worker is never delivered
to the new one. Register writes are idempotent, so sending one again is safe even when
the dead worker had applied it. To the guest a restart looks like a slow register access.

The eventfds stay open here: KVM drops an irqfd when its eventfd file is released, and
keeping our copy keeps the routing in place while a device worker is being replaced.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from shared.devworker_client import DEFAULT_TIMEOUT_S, MmioAborted, MmioClient, MmioTimeout
from shared.kvm import Vm
from shared.layout import VIRTIO_MMIO_SIZE
from shared.virtio import constants as c
from vcpu_worker.mmio_bus import MmioBus

RETRY_AFTER_S = 1.0
RESTART_WAIT_S = 10.0  # how long an access waits for a replacement worker


@dataclass(frozen=True)
class VirtioDeviceArgs:
    """One entry of the vCPU worker's `virtio_devices` argument (fd fields index into fds)."""

    name: str
    base: int
    gsi: int
    mmio_endpoint: str
    queue_fds: list[int]
    irqfd: int

    @classmethod
    def from_args(cls, raw: dict[str, Any]) -> VirtioDeviceArgs:
        return cls(
            str(raw["name"]),
            int(raw["base"]),
            int(raw["gsi"]),
            str(raw["mmio_endpoint"]),
            [int(i) for i in raw["queue_fds"]],
            int(raw["irqfd"]),
        )


class RemoteMmioDevice:
    """A virtio-mmio window served by a device worker; one MMIO client per vCPU thread."""

    def __init__(
        self, name: str, endpoint: str, ctx: zmq.Context, report: Callable[[str], None], timeout_s: float
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self._ctx = ctx
        self._report = report
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._clients: list[MmioClient] = []
        self._lock = threading.Lock()
        self._up = threading.Condition(self._lock)
        self._restarting = False
        self._down_until = 0.0
        self._generation = 0  # bumped on each worker change: every thread then opens a new client
        self.timeouts = 0
        self.skipped = 0

    def _client(self) -> MmioClient:
        client: MmioClient | None = getattr(self._local, "client", None)
        generation = self._generation
        if client is not None and getattr(self._local, "generation", 0) != generation:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()  # in its own thread: ZeroMQ sockets are not thread-safe
            client = None
        if client is None:
            client = MmioClient(self._ctx, self.endpoint, self._timeout_s)
            self._local.client, self._local.generation = client, generation
            with self._lock:
                self._clients.append(client)
        return client

    def _available(self) -> bool:
        if time.monotonic() >= self._down_until:
            return True
        with self._lock:
            self.skipped += 1
        return False

    def _failed(self, error: MmioTimeout) -> None:
        with self._lock:
            self.timeouts += 1
            self._down_until = time.monotonic() + RETRY_AFTER_S
        self._report(f"virtio device {self.name}: {error}; its window reads all-ones for {RETRY_AFTER_S:g} s")

    def mark_down(self) -> None:
        """The worker is gone for good (the supervisor saw it die): stop sending it requests."""
        with self._lock:
            self._generation += 1
            self._restarting = False
            self._down_until = math.inf
            self._up.notify_all()

    def mark_restarting(self) -> None:
        """The worker died and a replacement is coming: hold accesses until `mark_up`."""
        with self._lock:
            self._generation += 1  # abandons requests the dead worker will never answer
            self._restarting = True

    def mark_up(self) -> None:
        """A replacement worker serves the endpoint: forward again, on new sockets."""
        with self._lock:
            self._generation += 1
            self._restarting = False
            self._down_until = 0.0
            self._up.notify_all()

    def _forward(self, call: Callable[[MmioClient, Callable[[], bool]], int]) -> int | None:
        """Send one access; None when the window must answer without its worker."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            with self._lock:
                while self._restarting and (left := deadline - time.monotonic()) > 0:
                    self._up.wait(left)
                generation = self._generation
                if self._restarting:
                    self.skipped += 1
                    return None
            if not self._available():
                return None
            try:
                return call(self._client(), lambda g=generation: self._generation != g)  # type: ignore[misc]
            except MmioAborted:
                continue  # the worker died under this access: wait for its replacement, send again
            except MmioTimeout as e:
                self._failed(e)
                return None

    def read(self, offset: int, size: int) -> int:
        value = self._forward(lambda client, abort: client.read(offset, size, abort))
        return (1 << (8 * size)) - 1 if value is None else value

    def write(self, offset: int, size: int, value: int) -> None:
        def write(client: MmioClient, abort: Callable[[], bool]) -> int:
            client.write(offset, size, value, abort)
            return 0

        self._forward(write)

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()


def mark_device_down(devices: list[RemoteMmioDevice], name: str) -> None:
    for device in devices:
        if device.name == name:
            device.mark_down()


def mark_device_restarting(devices: list[RemoteMmioDevice], name: str) -> None:
    for device in devices:
        if device.name == name:
            device.mark_restarting()


def mark_device_up(devices: list[RemoteMmioDevice], name: str) -> None:
    for device in devices:
        if device.name == name:
            device.mark_up()


def attach_virtio_devices(
    vm: Vm,
    bus: MmioBus,
    devices: list[dict[str, Any]],
    fds: list[int],
    ctx: zmq.Context,
    report: Callable[[str], None],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[RemoteMmioDevice]:
    """Register each device's ioeventfds and irqfd with KVM and put its window on `bus`."""
    attached = []
    for raw in devices:
        dev = VirtioDeviceArgs.from_args(raw)
        for index, fd_index in enumerate(dev.queue_fds):
            vm.register_ioeventfd(fds[fd_index], dev.base + c.MMIO_QUEUE_NOTIFY, 4, datamatch=index)
        vm.register_irqfd(fds[dev.irqfd], dev.gsi)
        remote = RemoteMmioDevice(dev.name, dev.mmio_endpoint, ctx, report, timeout_s)
        bus.add(dev.base, VIRTIO_MMIO_SIZE, remote)
        attached.append(remote)
    return attached

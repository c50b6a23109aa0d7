"""virtio-mmio devices as the vCPU worker sees them: a window forwarded to a device worker.

For each device the supervisor passes (window base, GSI), its end of the device's MMIO
channel (a SEQPACKET socketpair: the vCPU worker never connects to anything) and eventfds it
created: one per queue and the irqfd. This process created the VM, so it is the one that
can register them with KVM: a guest write of queue index i to QueueNotify signals queue
i's eventfd inside KVM (no exit), and a write to the irqfd injects the GSI. Every other
access to the window exits to a vCPU thread and is forwarded, synchronously, to the
device worker (`RemoteMmioDevice`; one request at a time per device, as the single-threaded
worker serves them anyway).

A device worker that does not answer must not hang the guest: the access times out
(reads see all-ones, as for a missing device), it is reported, and for the next
`RETRY_AFTER_S` the window answers at once instead of waiting again. A worker that dies
closes its end of the channel, which an access in flight sees at once; the supervisor
then says `DeviceDown` (the window answers at once from then on) or `DeviceRestarting`
(accesses wait, up to `RESTART_WAIT_S`, for the replacement). The replacement comes with a
new channel, whose end arrives with `DeviceUp` over this worker's fd channel, so a request
meant for the dead worker is never delivered to the new one; an access the dead worker
never answered is sent again. Register writes are idempotent, so sending one again is
safe even when the dead worker had applied it. To the guest a restart looks like a slow
register access.

The registers a driver touches on every interrupt never leave this process: InterruptStatus,
InterruptACK, ConfigGeneration and config-space reads are answered from the device's
register page (`shared.virtio.regpage.VcpuRegisters`, a memfd the device worker writes),
so an interrupt costs the guest two local exits, not two round trips. Writes the device
must act on (Status, queue set-up, features, config writes) are still forwarded and
answered synchronously; after a forwarded reset (Status = 0) this side clears
InterruptStatus, since it is the one that stores InterruptACKs.

The eventfds stay open here: KVM drops an irqfd when its eventfd file is released, and
keeping our copy keeps the routing in place while a device worker is being replaced.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable

from shared.devworker_client import DEFAULT_TIMEOUT_S, MmioAborted, MmioClient, MmioClosed, MmioTimeout
from shared.kvm import Vm
from shared.layout import VIRTIO_MMIO_SIZE
from shared.spawn import VcpuDevice
from shared.virtio import constants as c
from shared.virtio.regpage import ALL_BITS, VcpuRegisters
from vcpu_worker.mmio_bus import MmioBus

RETRY_AFTER_S = 1.0
RESTART_WAIT_S = 10.0  # how long an access waits for a replacement worker


class RemoteMmioDevice:
    """A virtio-mmio window served by a device worker over its MMIO channel."""

    def __init__(
        self,
        name: str,
        client: MmioClient,
        report: Callable[[str], None],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        registers: VcpuRegisters | None = None,
    ) -> None:
        self.name = name
        self.registers = registers
        self._report = report
        self._timeout_s = timeout_s
        self._client = client
        self._io = threading.Lock()  # one request at a time on the channel
        self._lock = threading.Lock()
        self._up = threading.Condition(self._lock)
        self._restarting = False
        self._down_until = 0.0
        self._generation = 0  # bumped on each worker change: requests in flight are abandoned
        self.timeouts = 0
        self.skipped = 0

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

    def _closed(self, generation: int) -> None:
        """An access found the worker's end closed before the supervisor said why: wait for
        its word (`mark_up` or `mark_down`) as for a restart."""
        with self._lock:
            if self._generation == generation:
                self._restarting = True

    def mark_up(self, client: MmioClient) -> None:
        """A replacement worker serves the device over the new channel `client`."""
        with self._lock:
            old, self._client = self._client, client
            self._generation += 1
            self._restarting = False
            self._down_until = 0.0
            self._up.notify_all()
        with self._io:  # a request still on the old channel has been abandoned by now
            old.close()

    def _forward(self, call: Callable[[MmioClient, Callable[[], bool]], int]) -> int | None:
        """Send one access; None when the window must answer without its worker."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            with self._lock:
                while self._restarting and (left := deadline - time.monotonic()) > 0:
                    self._up.wait(left)
                if self._restarting:  # no word from the supervisor: treat the device as gone
                    self._restarting = False
                    self._down_until = math.inf
                    self.skipped += 1
                    return None
                generation, client = self._generation, self._client
            if not self._available():
                return None
            try:
                with self._io:
                    if generation != self._generation:
                        continue
                    return call(client, lambda g=generation: self._generation != g)  # type: ignore[misc]
            except MmioClosed:
                self._closed(generation)
                continue  # the worker died under this access: wait for the supervisor's word
            except MmioAborted:
                continue  # the worker died under this access: wait for its replacement, send again
            except MmioTimeout as e:
                self._failed(e)
                return None

    def _local(self) -> VcpuRegisters | None:
        """The register page, unless the device is gone (its window then reads all-ones)."""
        if self.registers is None or self._down_until == math.inf:
            return None
        return self.registers

    def read(self, offset: int, size: int) -> int:
        registers = self._local()
        if registers is not None and (local := registers.read(offset, size)) is not None:
            return local
        value = self._forward(lambda client, abort: client.read(offset, size, abort))
        return (1 << (8 * size)) - 1 if value is None else value

    def write(self, offset: int, size: int, value: int) -> None:
        registers = self._local()
        if registers is not None and registers.write(offset, size, value):
            return

        def write(client: MmioClient, abort: Callable[[], bool]) -> int:
            client.write(offset, size, value, abort)
            return 0

        self._forward(write)
        if registers is not None and offset == c.MMIO_STATUS and size == 4 and value == 0:
            registers.ack_bits(ALL_BITS)  # a reset clears InterruptStatus (spec 4.2.2)

    def close(self) -> None:
        with self._io:
            self._client.close()
        if self.registers is not None:
            self.registers.close()


def _named(devices: list[RemoteMmioDevice], name: str) -> list[RemoteMmioDevice]:
    return [device for device in devices if device.name == name]


def mark_device_down(devices: list[RemoteMmioDevice], name: str) -> None:
    for device in _named(devices, name):
        device.mark_down()


def mark_device_restarting(devices: list[RemoteMmioDevice], name: str) -> None:
    for device in _named(devices, name):
        device.mark_restarting()


def mark_device_up(devices: list[RemoteMmioDevice], name: str, channel: socket.socket) -> bool:
    """The replacement of device `name` answers on `channel`; False (channel closed) if no
    such device."""
    for device in _named(devices, name):
        device.mark_up(MmioClient(channel, device._timeout_s, name))
        return True
    channel.close()
    return False


def attach_virtio_devices(
    vm: Vm,
    bus: MmioBus,
    devices: list[VcpuDevice],
    report: Callable[[str], None],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[RemoteMmioDevice]:
    """Register each device's ioeventfds and irqfd with KVM and put its window on `bus`."""
    attached = []
    for dev in devices:
        for index, fd in enumerate(dev.queue_fds):
            vm.register_ioeventfd(fd, dev.base + c.MMIO_QUEUE_NOTIFY, 4, datamatch=index)
        vm.register_irqfd(dev.irqfd, dev.gsi)
        client = MmioClient(socket.socket(fileno=dev.mmio_channel), timeout_s, dev.name)
        registers = VcpuRegisters(dev.regs) if dev.regs >= 0 else None
        remote = RemoteMmioDevice(dev.name, client, report, timeout_s, registers)
        bus.add(dev.base, VIRTIO_MMIO_SIZE, remote)
        attached.append(remote)
    return attached

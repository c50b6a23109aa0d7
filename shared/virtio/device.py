"""What a virtio device looks like to its transport, and how it raises interrupts.

The device knows its queues, guest memory, an `Interrupt` and its own backend. It does
not know the transport (virtio-mmio registers live in `mmio.py`), nor eventfds, nor
ZeroMQ: the worker process wires those (ioeventfd -> `process_queue`, `Interrupt` ->
irqfd). The same device class therefore runs in a worker or in a unit test unchanged.

Lifecycle (driven by the transport from the driver's status writes):

    created --activate(mem, queues, interrupt, features)--> active
       ^                                                       |
       +-------------------------- reset() --------------------+

`process_queue` never lets a guest-caused exception escape: a malformed chain fails that
request, a corrupt ring makes the device call `interrupt.signal_needs_reset(reason)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shared.memory import GuestMemory
from shared.virtio.queue import Queue


class DeviceError(Exception):
    """A device could not be activated (host-side trouble or unusable guest setup)."""


class Interrupt(Protocol):
    """How a device tells the driver something happened.

    The worker implements it (via the transport) by setting InterruptStatus bits and
    writing the irqfd; tests use `shared.virtio.testing.FakeInterrupt`.
    """

    def signal_used_queue(self) -> None:
        """New entries are in a used ring."""

    def signal_config_change(self) -> None:
        """The device configuration space changed (e.g. a resized disk)."""

    def signal_needs_reset(self, reason: str) -> None:
        """The device cannot go on (corrupt rings): set DEVICE_NEEDS_RESET, notify the driver."""


class VirtioDevice(Protocol):
    """The interface the transport drives."""

    @property
    def device_type(self) -> int:
        """Virtio device id (`constants.VIRTIO_ID_*`)."""

    @property
    def avail_features(self) -> int:
        """Feature bits offered to the driver."""

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        """One maximum size per queue, in queue order."""

    def read_config(self, offset: int, size: int) -> bytes:
        """`size` bytes of config space at `offset` (zeros past its end)."""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into config space (ignored where read-only)."""

    def activate(self, mem: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, features: int) -> None:
        """Start serving `queues` with the negotiated `features`; raises DeviceError."""

    def process_queue(self, index: int) -> None:
        """The driver notified queue `index`: handle what is available."""

    def reset(self) -> None:
        """Forget the activation; the device can be activated again afterwards."""


def config_slice(config: bytes, offset: int, size: int) -> bytes:
    """`size` bytes of `config` at `offset`, zero-padded where it runs past the end."""
    if offset < 0 or size < 0:
        return bytes(size if size > 0 else 0)
    return config[offset : offset + size].ljust(size, b"\0")

"""The virtio-mmio transport, version 2 only (spec 4.2): register file and status machine.

`MmioTransport` owns everything the driver sees through the 4 KiB MMIO window: feature
negotiation, queue setup, InterruptStatus, the device status, ConfigGeneration. It is
also the `Interrupt` the device raises: the worker gives it a `trigger` callable that
writes the irqfd. Installation in a worker (compare Firecracker's transport doc):

1. MMIO reads/writes trapped by the vCPU process arrive over ZeroMQ and go to
   `read(offset, size)` / `write(offset, size, value)`; reads are answered.
2. Each queue's ioeventfd (registered at QueueNotify) calls `notify_queue(index)`.
3. `trigger` writes the device's irqfd.

All calls come from the worker's single event loop, so nothing here is locked.
A driver that misbehaves never gets an exception back: the access is ignored (and
logged, rate-limited) or the device goes to DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shared.memory import GuestMemory
from shared.ratelimited_log import RateLimitedLog
from shared.virtio import constants as c
from shared.virtio.device import DeviceError, VirtioDevice
from shared.virtio.queue import Queue, QueueError
from shared.virtio.regpage import ALL_BITS, CONFIG_MAX, DeviceRegisters

_log = RateLimitedLog(logging.getLogger(__name__))
_SNAPSHOT_VERSION = 1
_CONFIG_ACCESS_SIZES = (1, 2, 4, 8)


class TransportError(Exception):
    """A transport snapshot cannot be restored onto this device."""


class MmioTransport:
    """virtio-mmio v2 registers in front of one `VirtioDevice`."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        trigger: Callable[[], None] = lambda: None,
        registers: DeviceRegisters | None = None,
    ) -> None:
        self.device = device
        self.mem = mem
        self._trigger = trigger
        # InterruptStatus and the config copy in the page the vCPU worker answers from
        # (shared.virtio.regpage); without one (unit tests), InterruptStatus is a plain int.
        self.registers = registers
        self._interrupt_status = 0
        self.queues = [Queue(mem, size) for size in device.queue_max_sizes]
        self.config_generation = 0
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.activated = False
        for queue in self.queues:
            queue.reset()

    @property
    def offered_features(self) -> int:
        """What DeviceFeatures shows: the device's features, always with VERSION_1."""
        return self.device.avail_features | c.feature(c.VIRTIO_F_VERSION_1)

    # --- Interrupt, for the device ---------------------------------------------------

    def signal_used_queue(self) -> None:
        self._raise(c.INTERRUPT_USED_RING)

    def signal_config_change(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._raise(c.INTERRUPT_CONFIG_CHANGE)

    def signal_needs_reset(self, reason: str) -> None:
        _log.error("virtio device %#x needs a reset: %s", self.device.device_type, reason)
        self.status |= c.STATUS_DEVICE_NEEDS_RESET
        self._raise(c.INTERRUPT_CONFIG_CHANGE)  # spec 2.1.2

    def _raise(self, bit: int) -> None:
        if self.registers is None:
            self._interrupt_status |= bit
        else:
            if bit & c.INTERRUPT_CONFIG_CHANGE:
                self.publish_registers()  # the new config is in the copy before the driver hears of it
            self.registers.raise_bits(bit)  # after the used ring, before the irqfd (regpage.py)
        self._trigger()

    def attach_registers(self, registers: DeviceRegisters) -> None:
        """Keep InterruptStatus and the config copy in `registers` from now on (before any
        interrupt is raised: the worker does this at start)."""
        self.registers = registers

    @property
    def interrupt_status(self) -> int:
        """InterruptStatus: the page's view when there is a page."""
        return self._interrupt_status if self.registers is None else self.registers.status()

    def _ack(self, bits: int) -> None:
        if self.registers is None:
            self._interrupt_status &= ~bits
        else:
            self.registers.ack(bits)

    def publish_registers(self) -> None:
        """Refresh the page's config copy (after anything that may have changed config space)."""
        if self.registers is not None:
            self.registers.publish_config(self.config_generation, self.device.read_config(0, CONFIG_MAX))

    # --- queue notifications ---------------------------------------------------------

    @property
    def serving(self) -> bool:
        """True while the device is active and neither failed nor waiting for a reset."""
        return self.activated and not self.status & (c.STATUS_DEVICE_NEEDS_RESET | c.STATUS_FAILED)

    def notify_queue(self, index: int) -> None:
        """The driver kicked queue `index` (ioeventfd or a QueueNotify write)."""
        if not self.serving or not 0 <= index < len(self.queues):
            return
        try:
            self.device.process_queue(index)
        except QueueError as e:
            self.signal_needs_reset(str(e))
        except Exception as e:  # a device bug: keep the worker, lose the device
            _log.exception("virtio device %#x crashed", self.device.device_type)
            self.signal_needs_reset(f"internal error: {e!r}")

    # --- register reads --------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """The value the driver reads at `offset` (unknown or malformed accesses read 0)."""
        if offset >= c.MMIO_CONFIG:
            return self._read_config(offset - c.MMIO_CONFIG, size)
        if size != 4 or offset % 4:
            _log.warning("Guest read virtio-mmio register %#x with size %d", offset, size)
            return 0
        return self._read_register(offset)

    def _read_config(self, offset: int, size: int) -> int:
        if size not in _CONFIG_ACCESS_SIZES or offset + size > c.MMIO_WINDOW_SIZE - c.MMIO_CONFIG:
            _log.warning("Guest read config space at %#x with size %d", offset, size)
            return 0
        return int.from_bytes(self.device.read_config(offset, size)[:size].ljust(size, b"\0"), "little")

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        match offset:
            case c.MMIO_MAGIC_VALUE:
                return c.MMIO_MAGIC
            case c.MMIO_VERSION:
                return c.MMIO_VERSION_MODERN
            case c.MMIO_DEVICE_ID:
                return self.device.device_type
            case c.MMIO_VENDOR_ID:
                return c.VENDOR_ID
            case c.MMIO_DEVICE_FEATURES:
                return self._feature_page(self.offered_features, self.device_features_sel)
            case c.MMIO_QUEUE_NUM_MAX:
                return queue.max_size if queue else 0
            case c.MMIO_QUEUE_READY:
                return int(queue.ready) if queue else 0
            case c.MMIO_INTERRUPT_STATUS:
                return self.interrupt_status
            case c.MMIO_STATUS:
                return self.status
            case c.MMIO_CONFIG_GENERATION:
                return self.config_generation
            case c.MMIO_SHM_LEN_LOW | c.MMIO_SHM_LEN_HIGH:
                return 0xFFFFFFFF  # no shared memory regions (spec 4.2.2)
            case _:
                return 0

    @staticmethod
    def _feature_page(features: int, page: int) -> int:
        return (features >> (32 * page)) & 0xFFFFFFFF if page < 2 else 0

    def _selected_queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    # --- register writes -------------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> None:
        """A driver write of `value` (`size` bytes) at `offset`."""
        if offset >= c.MMIO_CONFIG:
            self._write_config(offset - c.MMIO_CONFIG, size, value)
        elif size != 4 or offset % 4:
            _log.warning("Guest wrote virtio-mmio register %#x with size %d", offset, size)
        else:
            self._write_register(offset, value & 0xFFFFFFFF)
        self.publish_registers()

    def _write_config(self, offset: int, size: int, value: int) -> None:
        if size not in _CONFIG_ACCESS_SIZES or offset + size > c.MMIO_WINDOW_SIZE - c.MMIO_CONFIG:
            _log.warning("Guest wrote config space at %#x with size %d", offset, size)
        elif not self.status & c.STATUS_DRIVER or self.status & c.STATUS_FAILED:
            _log.warning("Guest wrote config space in status %#x", self.status)
        else:
            self.device.write_config(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _write_register(self, offset: int, value: int) -> None:
        match offset:
            case c.MMIO_DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            case c.MMIO_DRIVER_FEATURES:
                self._write_driver_features(value)
            case c.MMIO_DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            case c.MMIO_QUEUE_SEL:
                self.queue_sel = value
            case c.MMIO_QUEUE_NOTIFY:
                self.notify_queue(value & 0xFFFF)
            case c.MMIO_INTERRUPT_ACK:
                self._ack(value)
            case c.MMIO_STATUS:
                self._write_status(value & 0xFF)
            case _:
                self._write_queue_register(offset, value)

    def _write_driver_features(self, value: int) -> None:
        allowed = self.status & c.STATUS_DRIVER and not self.status & c.STATUS_FEATURES_OK
        if not allowed or self.driver_features_sel > 1:
            _log.warning("Guest wrote DriverFeatures in status %#x, page %d", self.status, self.driver_features_sel)
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        setup = self.status & c.STATUS_FEATURES_OK and not self.status & (c.STATUS_DRIVER_OK | c.STATUS_FAILED)
        if queue is None or not setup:
            _log.warning("Guest wrote queue register %#x (queue %d) in status %#x", offset, self.queue_sel, self.status)
            return
        match offset:
            case c.MMIO_QUEUE_NUM:
                queue.size = value & 0xFFFF
            case c.MMIO_QUEUE_READY:
                queue.ready = value == 1
            case c.MMIO_QUEUE_DESC_LOW | c.MMIO_QUEUE_DESC_HIGH:
                queue.desc_addr = _set_half(queue.desc_addr, offset == c.MMIO_QUEUE_DESC_HIGH, value)
            case c.MMIO_QUEUE_DRIVER_LOW | c.MMIO_QUEUE_DRIVER_HIGH:
                queue.avail_addr = _set_half(queue.avail_addr, offset == c.MMIO_QUEUE_DRIVER_HIGH, value)
            case c.MMIO_QUEUE_DEVICE_LOW | c.MMIO_QUEUE_DEVICE_HIGH:
                queue.used_addr = _set_half(queue.used_addr, offset == c.MMIO_QUEUE_DEVICE_HIGH, value)
            case _:
                _log.warning("Guest wrote read-only or unknown register %#x", offset)

    # --- device status (spec 2.1, 3.1) ------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        current = self.status & ~c.STATUS_DEVICE_NEEDS_RESET
        if value & current != current:
            _log.warning("Guest cleared device status bits: %#x -> %#x", self.status, value)
            return
        added = value & ~self.status
        steps = (
            (c.STATUS_ACKNOWLEDGE, self._acknowledge),
            (c.STATUS_DRIVER, self._driver),
            (c.STATUS_FEATURES_OK, self._features_ok),
            (c.STATUS_DRIVER_OK, self._driver_ok),
        )
        for bit, step in steps:
            if added & bit and not step():
                break
        if added & c.STATUS_FAILED:
            self.status |= c.STATUS_FAILED

    def _require(self, bit: int, needed: int) -> bool:
        if self.status & needed != needed or self.status & c.STATUS_FAILED:
            _log.warning("Guest set status bit %#x in status %#x", bit, self.status)
            return False
        self.status |= bit
        return True

    def _acknowledge(self) -> bool:
        return self._require(c.STATUS_ACKNOWLEDGE, 0)

    def _driver(self) -> bool:
        return self._require(c.STATUS_DRIVER, c.STATUS_ACKNOWLEDGE)

    def _features_ok(self) -> bool:
        unknown = self.driver_features & ~self.offered_features
        if unknown or not self.driver_features & c.feature(c.VIRTIO_F_VERSION_1):
            _log.warning(
                "Guest accepted features %#x, offered %#x: refused", self.driver_features, self.offered_features
            )
            return False
        if not self._require(c.STATUS_FEATURES_OK, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER):
            return False
        for queue in self.queues:
            queue.event_idx = bool(self.driver_features & c.feature(c.VIRTIO_F_EVENT_IDX))
            queue.indirect = bool(self.driver_features & c.feature(c.VIRTIO_F_INDIRECT_DESC))
        return True

    def _driver_ok(self) -> bool:
        if not self._require(c.STATUS_DRIVER_OK, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK):
            return False
        self._activate()
        return True

    def _activate(self) -> None:
        try:
            for index, queue in enumerate(self.queues):
                if not queue.ready:
                    raise QueueError(f"Guest set DRIVER_OK with queue {index} not ready")
                queue.check()
            self.device.activate(self.mem, self.queues, self, self.driver_features)
        except (QueueError, DeviceError) as e:
            self.signal_needs_reset(f"activation failed: {e}")
            return
        self.activated = True

    def reset(self) -> None:
        """Driver wrote 0 to Status: back to the initial state; ConfigGeneration keeps counting."""
        if self.activated:
            self.device.reset()
        self._clear()
        self._ack(ALL_BITS)

    # --- persistence -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Transport and queue state as plain data (msgpack/JSON-safe)."""
        return {
            "version": _SNAPSHOT_VERSION,
            "device_type": self.device.device_type,
            "status": self.status,
            "device_features_sel": self.device_features_sel,
            "driver_features_sel": self.driver_features_sel,
            "driver_features": self.driver_features,
            "queue_sel": self.queue_sel,
            "interrupt_status": self.interrupt_status,
            "config_generation": self.config_generation,
            "activated": self.activated,
            "queues": [queue.snapshot() for queue in self.queues],
        }

    def restore(self, state: dict[str, Any], *, resync: bool = False) -> None:
        """Load a `snapshot()` into a fresh transport, re-activating the device if it was.

        `resync=True` takes the queue positions from the used rings in guest memory
        (for a worker that crashed after its snapshot; see `Queue.resync_from_used_ring`).
        After restoring, the worker should `kick_all()`: kicks and interrupts may have
        been lost while no worker was running.
        """
        self._check_snapshot(state)
        self._clear()
        for queue, queue_state in zip(self.queues, state["queues"], strict=True):
            queue.restore(queue_state)
        self.status = int(state["status"])
        self.device_features_sel = int(state["device_features_sel"])
        self.driver_features_sel = int(state["driver_features_sel"])
        self.driver_features = int(state["driver_features"])
        self.queue_sel = int(state["queue_sel"])
        if self.registers is None:  # with a page, the page kept InterruptStatus as it was
            self._interrupt_status = int(state["interrupt_status"])
        self.config_generation = int(state["config_generation"])
        if state["activated"]:
            self._reactivate(resync)

    def _check_snapshot(self, state: dict[str, Any]) -> None:
        if state.get("version") != _SNAPSHOT_VERSION:
            raise TransportError(f"snapshot version {state.get('version')!r} is not {_SNAPSHOT_VERSION}")
        if state.get("device_type") != self.device.device_type:
            raise TransportError(f"snapshot is of device type {state.get('device_type')!r}")
        if len(state.get("queues", ())) != len(self.queues):
            raise TransportError(f"snapshot has {len(state.get('queues', ()))} queues, device has {len(self.queues)}")

    def _reactivate(self, resync: bool) -> None:
        try:
            for queue in self.queues:
                queue.check()
                if resync:
                    queue.resync_from_used_ring()
            self.device.activate(self.mem, self.queues, self, self.driver_features)
        except (QueueError, DeviceError) as e:
            self.signal_needs_reset(f"re-activation failed: {e}")
            return
        self.activated = True

    def kick_all(self) -> None:
        """Process every queue and raise a used-ring interrupt (spurious ones are harmless)."""
        for index in range(len(self.queues)):
            self.notify_queue(index)
        if self.serving:
            self.signal_used_queue()


def _set_half(current: int, high: bool, value: int) -> int:
    if high:
        return (current & 0xFFFFFFFF) | (value << 32)
    return (current & ~0xFFFFFFFF) | value

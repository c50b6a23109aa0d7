"""Test helpers: a driver-side mock of a split virtqueue, a fake interrupt, guest memory.

`MockDriver` plays the guest driver: it lays out a descriptor table and both rings in a
`GuestMemory`, builds chains (readable and writable buffers, indirect tables), publishes
them, and reads used entries back. It can also write what no correct driver would
(loops, out-of-range addresses, a runaway avail index) for the malicious-guest tests,
the fuzz tests and the benchmarks. (Same idea as rust-vmm virtio-queue's `mock.rs`.)

With `event_idx` it also plays the driver's half of VIRTIO_F_EVENT_IDX as Linux does:
`kick_needed()` asks whether the chains published since the last kick crossed the
device's `avail_event` (else the device is still draining and will see them), and
`enable_interrupts()` moves `used_event` to what it has consumed.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.layout import MiB
from shared.memory import GuestMemory, create_guest_memfd
from shared.virtio import constants as c
from shared.virtio.mmio import MmioTransport
from shared.virtio.queue import Queue, vring_need_event

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


def make_guest_memory(size: int = 16 * MiB) -> GuestMemory:
    """A fresh, zeroed guest memory of `size` bytes, as the workers map it."""
    fd = create_guest_memfd(size)
    try:
        return GuestMemory.map(fd, size)
    finally:
        os.close(fd)


@dataclass
class FakeInterrupt:
    """Counts the signals a device raises."""

    used_queue: int = 0
    config_change: int = 0
    needs_reset: list[str] = field(default_factory=list)

    def signal_used_queue(self) -> None:
        self.used_queue += 1

    def signal_config_change(self) -> None:
        self.config_change += 1

    def signal_needs_reset(self, reason: str) -> None:
        self.needs_reset.append(reason)


@dataclass(frozen=True)
class Buffer:
    """A buffer the mock driver placed in a chain."""

    addr: int
    length: int
    writable: bool


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class MockDriver:
    """The guest side of one split virtqueue living at `base` in `mem`."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int = c.DEFAULT_QUEUE_SIZE,
        *,
        base: int = 0x10000,
        data_size: int = 4 * MiB,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr = _align(base, c.DESC_TABLE_ALIGN)
        self.avail_addr = self.desc_addr + c.DESC_SIZE * size
        self.used_addr = _align(self.avail_addr + 6 + 2 * size, c.USED_RING_ALIGN)
        self.data_start = _align(self.used_addr + 6 + 8 * size, 4096)
        self.data_end = self.data_start + data_size
        if not mem.contains(base, self.data_end - base):
            raise ValueError("the mock queue does not fit in guest memory")
        self._next_data = self.data_start
        self._free: deque[int] = deque(range(size))
        self._chains: dict[int, tuple[list[int], list[Buffer]]] = {}
        self.avail_idx = 0
        self.last_used = 0
        self.kicked_idx = 0  # avail_idx at the last kick_needed() call

    # --- setup -------------------------------------------------------------------------

    def configure(self, queue: Queue) -> Queue:
        """Point `queue` at this driver's rings, as the transport would, and mark it ready."""
        queue.size = self.size
        queue.desc_addr, queue.avail_addr, queue.used_addr = self.desc_addr, self.avail_addr, self.used_addr
        queue.event_idx, queue.indirect = self.event_idx, self.indirect
        queue.ready = True
        return queue

    def queue(self) -> Queue:
        """A device-side `Queue` set up for this driver."""
        return self.configure(Queue(self.mem, max(self.size, c.DEFAULT_QUEUE_SIZE)))

    def alloc(self, length: int, align: int = 16) -> int:
        """Guest address of `length` bytes of buffer space (wraps around when full)."""
        addr = _align(self._next_data, align)
        if addr + length > self.data_end:
            addr = self.data_start
        if addr + length > self.data_end:
            raise ValueError(f"a {length}-byte buffer does not fit the mock's data area")
        self._next_data = addr + length
        return addr

    # --- building chains ----------------------------------------------------------------

    def write_descriptor(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Raw write of descriptor `index` (anything goes: used for malformed chains)."""
        self.mem.write(self.desc_addr + c.DESC_SIZE * index, _DESC.pack(addr, length, flags, next))

    def write_indirect_table(self, entries: Sequence[tuple[int, int, int, int]]) -> int:
        """Write (addr, len, flags, next) entries as an indirect table; returns its address."""
        table = self.alloc(c.DESC_SIZE * len(entries), c.DESC_TABLE_ALIGN)
        for i, entry in enumerate(entries):
            self.mem.write(table + c.DESC_SIZE * i, _DESC.pack(*entry))
        return table

    def _buffers(self, readable: Sequence[bytes], writable: Sequence[int]) -> list[Buffer]:
        buffers = []
        for data in readable:
            addr = self.alloc(len(data))
            self.mem.write(addr, data)
            buffers.append(Buffer(addr, len(data), False))
        for length in writable:
            addr = self.alloc(length)
            self.mem.fill(addr, length, 0)
            buffers.append(Buffer(addr, length, True))
        return buffers

    def make_chain(
        self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *, indirect: bool = False
    ) -> int:
        """Build a chain of buffers holding `readable` data then `writable` zeroed lengths.

        Returns the head index; the chain is not yet published (see `publish`).
        """
        needed = 1 if indirect else len(readable) + len(writable)
        if not readable and not writable:
            raise ValueError("a chain needs at least one buffer")
        if needed > len(self._free):
            raise ValueError(f"{needed} descriptors needed, {len(self._free)} free: collect used() first")
        buffers = self._buffers(readable, writable)
        if indirect:
            return self._make_indirect(buffers)
        indices = [self._free.popleft() for _ in buffers]
        for i, (index, buf) in enumerate(zip(indices, buffers, strict=True)):
            last = i == len(buffers) - 1
            flags = (0 if last else c.VIRTQ_DESC_F_NEXT) | (c.VIRTQ_DESC_F_WRITE if buf.writable else 0)
            self.write_descriptor(index, buf.addr, buf.length, flags, 0 if last else indices[i + 1])
        self._chains[indices[0]] = (indices, buffers)
        return indices[0]

    def _make_indirect(self, buffers: list[Buffer]) -> int:
        entries = []
        for i, buf in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else c.VIRTQ_DESC_F_NEXT) | (c.VIRTQ_DESC_F_WRITE if buf.writable else 0)
            entries.append((buf.addr, buf.length, flags, 0 if last else i + 1))
        table = self.write_indirect_table(entries)
        head = self._free.popleft()
        self.write_descriptor(head, table, c.DESC_SIZE * len(entries), c.VIRTQ_DESC_F_INDIRECT)
        self._chains[head] = ([head], buffers)
        return head

    def publish(self, head: int) -> None:
        """Put `head` in the next avail slot and bump the avail index."""
        slot = self.avail_addr + 4 + 2 * (self.avail_idx % self.size)
        self.mem.write_u16(slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail_idx)

    def add_chain(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *, indirect: bool = False) -> int:
        """`make_chain` then `publish`; returns the head."""
        head = self.make_chain(readable, writable, indirect=indirect)
        self.publish(head)
        return head

    def set_avail_idx(self, value: int) -> None:
        """Write the avail index directly (e.g. to run it ahead of the ring)."""
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail_idx)

    # --- reading results ------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_addr + 2)

    def used(self, *, release: bool = True) -> list[tuple[int, int]]:
        """(head, len) entries the device added since the last call; frees their descriptors
        (unless `release` is False: a benchmark publishing the same chains again)."""
        entries = []
        end = self.used_idx
        while self.last_used != end:
            slot = self.used_addr + 4 + 8 * (self.last_used % self.size)
            head, length = _USED_ELEM.unpack(self.mem.read(slot, 8))
            entries.append((head, length))
            if release:
                self._release(head)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return entries

    def _release(self, head: int) -> None:
        indices, _ = self._chains.get(head, ([], []))
        self._free.extend(indices)

    def buffers(self, head: int) -> list[Buffer]:
        """The buffers of chain `head`, as built."""
        return self._chains[head][1]

    def written(self, head: int) -> list[bytes]:
        """Current contents of chain `head`'s writable buffers."""
        return [self.mem.read(b.addr, b.length) for b in self.buffers(head) if b.writable]

    # --- notification fields ----------------------------------------------------------------

    def kick_needed(self) -> bool:
        """Whether the device wants a notification for what was published since the last
        call (Linux's virtqueue_kick_prepare): with EVENT_IDX, when the new avail indices
        step past the device's `avail_event`; without, unless it set VIRTQ_USED_F_NO_NOTIFY."""
        old, self.kicked_idx = self.kicked_idx, self.avail_idx
        if old == self.avail_idx:
            return False
        if self.event_idx:
            return vring_need_event(self.avail_event(), self.avail_idx, old)
        return not self.used_flags() & c.VIRTQ_USED_F_NO_NOTIFY

    def enable_interrupts(self, *, delayed: bool = False) -> bool:
        """Ask for an interrupt at the next used entry after those consumed (Linux's
        virtqueue_enable_cb): `used_event` = last_used, or clear NO_INTERRUPT; `delayed`,
        only once 3/4 of the chains in flight are used (virtqueue_enable_cb_delayed, what
        Linux's virtio-net does for tx). False when entries were used meanwhile: the device
        may have passed `used_event` before it was written, so no interrupt comes for them;
        consume them now (then call this again)."""
        if self.event_idx:
            in_flight = (self.avail_idx - self.last_used) & 0xFFFF
            self.set_used_event((self.last_used + (in_flight * 3 // 4 if delayed else 0)) & 0xFFFF)
        else:
            self.set_avail_flags(0)
        return self.used_idx == self.last_used

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_addr + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_addr + 4 + 8 * self.size)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail_addr, flags)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_addr)


def mmio_setup(transport: MmioTransport, drivers: Sequence[MockDriver], features: int) -> int:
    """Run the driver init sequence (spec 3.1.1) over an `MmioTransport`; returns Status.

    `features` are the bits the driver accepts; queue i is set up from `drivers[i]`.
    """
    w = transport.write
    w(c.MMIO_STATUS, 4, 0)
    w(c.MMIO_STATUS, 4, c.STATUS_ACKNOWLEDGE)
    w(c.MMIO_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    for page in (0, 1):
        w(c.MMIO_DRIVER_FEATURES_SEL, 4, page)
        w(c.MMIO_DRIVER_FEATURES, 4, (features >> (32 * page)) & 0xFFFFFFFF)
    w(c.MMIO_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK)
    if not transport.read(c.MMIO_STATUS, 4) & c.STATUS_FEATURES_OK:
        return transport.read(c.MMIO_STATUS, 4)
    for index, driver in enumerate(drivers):
        _setup_queue(transport, index, driver)
    w(c.MMIO_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK | c.STATUS_DRIVER_OK)
    return transport.read(c.MMIO_STATUS, 4)


def _setup_queue(transport: MmioTransport, index: int, driver: MockDriver) -> None:
    w = transport.write
    w(c.MMIO_QUEUE_SEL, 4, index)
    w(c.MMIO_QUEUE_NUM, 4, driver.size)
    for low, addr in (
        (c.MMIO_QUEUE_DESC_LOW, driver.desc_addr),
        (c.MMIO_QUEUE_DRIVER_LOW, driver.avail_addr),
        (c.MMIO_QUEUE_DEVICE_LOW, driver.used_addr),
    ):
        w(low, 4, addr & 0xFFFFFFFF)
        w(low + 4, 4, addr >> 32)
    w(c.MMIO_QUEUE_READY, 4, 1)

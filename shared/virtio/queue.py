"""The split virtqueue (spec 2.7), device side. It knows no eventfd and no device.

The driver owns the descriptor table and the available ring, the device owns the used
ring, and all three live in guest memory that the guest can rewrite at any moment. So
nothing is validated ahead of time: the available index is checked each time it is read,
and each chain is walked and checked as it is popped (see `chain.walk_chain`).

Two kinds of guest error, two outcomes:

* `QueueError`: the ring itself is corrupt (the available index ran more than a queue
  ahead, a head index is out of range). Nothing read from the ring can be trusted any
  more, and continuing would only flood the log (Firecracker treats `InvalidAvailIdx` the
  same way): the device must stop and set DEVICE_NEEDS_RESET.
* `chain.ChainError`: one chain is malformed. Its head was consumed; the device returns
  it with `add_used(head, 0)` and carries on.

Memory ordering: guest memory is a shared mapping and we run on x86-64 (TSO), where
loads are not reordered with loads nor stores with stores, so "read avail idx, then the
ring entry" and "write the used element, then the used idx" need no explicit barrier. The
one store-then-load pair (`enable_notification`: write avail_event, then re-read avail idx)
would need a full fence on paper; the Python interpreter executes hundreds of instructions
between the two, far more than the store buffer holds, and a missed kick is recovered by
the next one. A port to a weakly ordered CPU must revisit this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from shared.memory import GuestMemory, GuestMemoryError
from shared.virtio.chain import DescriptorChain, walk_chain
from shared.virtio.constants import (
    AVAIL_RING_ALIGN,
    DEFAULT_QUEUE_SIZE,
    DESC_SIZE,
    DESC_TABLE_ALIGN,
    MAX_QUEUE_SIZE,
    USED_RING_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY,
)

_U16_MASK = 0xFFFF
MID_BATCH_CHECK = 16  # completions between two looks at used_event while a batch is drained


class _RingOffsets(NamedTuple):
    """Where one queue's ring fields are in guest memory, as word indices."""

    desc_table: int | None  # byte offset of the descriptor table, None if not all in guest memory
    avail_flags: int
    avail_idx: int
    avail_ring: int
    used_event: int
    used_flags: int
    used_idx: int
    used_ring32: int  # in u32 words: element i is at used_ring32 + 2 * i
    avail_event: int


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Linux's vring_need_event: did moving an index from `old` to `new` (u16, wrapping)
    step past `event`, i.e. is event in [old, new)?"""
    return ((new - event - 1) & _U16_MASK) < ((new - old) & _U16_MASK)


class QueueError(Exception):
    """The guest broke a virtqueue's setup or rings; the device must be reset."""


def is_valid_size(size: int) -> bool:
    """Split-ring sizes are powers of two in [1, 32768] (spec 2.7)."""
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


class Queue:
    """One split virtqueue: the driver's configuration plus the device's ring positions.

    The ring fields are accessed at word indices computed once per set-up (`_rings`),
    through guest memory's word views: one aligned load or store per field, as the
    driver's own accesses (a torn u16 index would make the guest see the ring run back).
    """

    def __init__(self, mem: GuestMemory, max_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if not is_valid_size(max_size):
            raise ValueError(f"queue max size {max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.mem = mem
        self._w16 = mem.view16  # ring fields: one aligned load or store each (memory.py)
        self._w32 = mem.view32
        self._offsets: _RingOffsets | None = None
        self.max_size = max_size
        # Called with the new `next_avail` after each pop (a restartable worker records it in
        # its state area, so its replacement knows which chains were in flight).
        self.pop_hook: Callable[[int], None] | None = None
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (spec 2.4)."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self.indirect = False
        self._num_added = 0

    # The set-up fields: changing one drops the cached ring offsets.

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size, self._offsets = value, None

    @property
    def desc_addr(self) -> int:
        return self._desc_addr

    @desc_addr.setter
    def desc_addr(self, value: int) -> None:
        self._desc_addr, self._offsets = value, None

    @property
    def avail_addr(self) -> int:
        return self._avail_addr

    @avail_addr.setter
    def avail_addr(self, value: int) -> None:
        self._avail_addr, self._offsets = value, None

    @property
    def used_addr(self) -> int:
        return self._used_addr

    @used_addr.setter
    def used_addr(self, value: int) -> None:
        self._used_addr, self._offsets = value, None

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @event_idx.setter
    def event_idx(self, value: bool) -> None:
        self._event_idx, self._offsets = value, None

    def _rings(self) -> _RingOffsets:
        """Word indices of the rings' fields (u16 words; the used elements in u32 words);
        QueueError when a ring is not in guest memory or not aligned."""
        offsets = self._offsets
        if offsets is None:
            try:
                avail = self.mem.offset_of(self._avail_addr, self._avail_len())
                used = self.mem.offset_of(self._used_addr, self._used_len())
            except GuestMemoryError as e:
                raise QueueError("Guest moved a ring outside guest memory") from e
            if avail % AVAIL_RING_ALIGN or used % USED_RING_ALIGN:
                raise QueueError("Guest placed a ring at an unaligned address")
            size = self._size
            avail, used = avail >> 1, used >> 1
            try:
                desc_table: int | None = self.mem.offset_of(self._desc_addr, DESC_SIZE * size)
            except GuestMemoryError:
                desc_table = None  # each descriptor is looked up (and fails) on its own
            offsets = self._offsets = _RingOffsets(
                desc_table=desc_table,
                avail_flags=avail,
                avail_idx=avail + 1,
                avail_ring=avail + 2,
                used_event=avail + 2 + size,
                used_flags=used,
                used_idx=used + 1,
                used_ring32=(used >> 1) + 1,
                avail_event=used + 2 + 4 * size,
            )
        return offsets

    # --- setup -----------------------------------------------------------------------

    def check(self) -> None:
        """Raise QueueError unless the driver's setup is usable (call before activation)."""
        if not is_valid_size(self.size) or self.size > self.max_size:
            raise QueueError(f"Guest set queue size {self.size}: not a power of two <= {self.max_size}")
        self._check_area("descriptor table", self.desc_addr, DESC_TABLE_ALIGN, DESC_SIZE * self.size)
        self._check_area("available ring", self.avail_addr, AVAIL_RING_ALIGN, self._avail_len())
        self._check_area("used ring", self.used_addr, USED_RING_ALIGN, self._used_len())

    def _check_area(self, what: str, addr: int, align: int, length: int) -> None:
        if addr % align:
            raise QueueError(f"Guest placed the {what} at {addr:#x}, not {align}-byte aligned")
        if not self.mem.contains(addr, length):
            raise QueueError(f"Guest placed the {what} at [{addr:#x}, +{length:#x}), outside guest memory")

    def _avail_len(self) -> int:
        return 4 + 2 * self._size + (2 if self._event_idx else 0)

    def _used_len(self) -> int:
        return 4 + 8 * self._size + (2 if self._event_idx else 0)

    # --- ring field access -------------------------------------------------------------

    def avail_idx(self) -> int:
        return int(self._w16[self._rings().avail_idx])

    def _load16(self, addr: int) -> int:
        try:
            return self.mem.read_u16(addr)
        except GuestMemoryError as e:
            raise QueueError("Guest moved a ring outside guest memory") from e

    def used_event(self) -> int:
        """The driver's `used_event` (only meaningful with VIRTIO_F_EVENT_IDX)."""
        return self._load16(self._avail_addr + 4 + 2 * self._size)

    def avail_event(self) -> int:
        """The `avail_event` the device last published."""
        return self._load16(self._used_addr + 4 + 8 * self._size)

    # --- consuming the available ring --------------------------------------------------

    def pending(self) -> int:
        """How many chains the driver has made available and we have not popped.

        Raises QueueError when the driver's index ran more than a queue ahead of ours.
        """
        count = (self._w16[self._rings().avail_idx] - self.next_avail) & _U16_MASK
        if count > self._size:
            raise QueueError(
                f"Guest moved the available index {count} entries ahead of the device (queue size {self._size})"
            )
        return int(count)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated, or None when the ring is empty.

        Raises QueueError (fatal) or ChainError (this chain only; its head is consumed).
        """
        if not self.ready or self.pending() == 0:
            return None
        size = self._size
        head = self._w16[self._rings().avail_ring + self.next_avail % size]
        if head >= size:
            raise QueueError(f"Guest put head index {head} in the available ring (queue size {size})")
        self.next_avail = (self.next_avail + 1) & _U16_MASK
        if self.pop_hook is not None:
            self.pop_hook(self.next_avail)
        return walk_chain(
            self.mem, self._desc_addr, size, head, indirect_ok=self.indirect, table_offset=self._rings().desc_table
        )

    def undo_pop(self) -> None:
        """Give back the last popped chain (e.g. the rate limiter said not yet)."""
        self.next_avail = (self.next_avail - 1) & _U16_MASK
        if self.pop_hook is not None:
            self.pop_hook(self.next_avail)

    # --- producing the used ring -------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Return chain `head` to the driver, `length` bytes written into it.

        The element is written before the index (program order; x86-64 keeps stores in
        order), so a driver that sees the new index sees the element.
        """
        if not 0 <= head < self._size:
            raise ValueError(f"head {head} is not a descriptor index of this queue")
        rings = self._rings()
        element = rings.used_ring32 + 2 * (self.next_used % self._size)
        self._w32[element] = head
        self._w32[element + 1] = length & 0xFFFFFFFF
        self.next_used = (self.next_used + 1) & _U16_MASK
        self._w16[rings.used_idx] = self.next_used
        self._num_added += 1

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the entries added since the last call.

        With VIRTIO_F_EVENT_IDX: only when `used_event` lies in the range just published
        (`vring_need_event`). Without: unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        added, self._num_added = self._num_added, 0
        if added == 0:
            return False
        rings = self._rings()
        if not self._event_idx:
            return not self._w16[rings.avail_flags] & VIRTQ_AVAIL_F_NO_INTERRUPT
        if added > _U16_MASK:
            return True
        new = self.next_used
        used_event = int(self._w16[rings.used_event])
        return vring_need_event(used_event, new, (new - added) & _U16_MASK)

    def notify_due(self) -> bool:
        """Mid-batch: whether to interrupt now, while the device keeps draining.

        With VIRTIO_F_EVENT_IDX, every `MID_BATCH_CHECK` completions, True when they passed
        the driver's `used_event`: a driver that consumed everything and asked for the next
        entry hears of the first ones at once and can refill the ring while the device
        works (a pipeline, not lock-step), and still gets one interrupt per `used_event` it
        sets. Without EVENT_IDX, False: the interrupt waits for the end of the batch.
        """
        if not self._event_idx or self._num_added < MID_BATCH_CHECK:
            return False
        return self.needs_notification()

    def enable_notification(self) -> bool:
        """Ask the driver to notify us of new chains; True if some arrived meanwhile.

        Call it when `pop` returned None, and pop again while it returns True, so a chain
        made available between the last pop and this call is not left waiting.
        """
        rings = self._rings()
        if self._event_idx:
            self._w16[rings.avail_event] = self.next_avail
        else:
            self._w16[rings.used_flags] = 0
        return self.pending() > 0

    def disable_notification(self) -> None:
        """Tell the driver it need not notify (a hint; without EVENT_IDX only: with it, not
        moving `avail_event` is what suppresses notifications)."""
        if not self._event_idx:
            self._w16[self._rings().used_flags] = VIRTQ_USED_F_NO_NOTIFY

    # --- persistence -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain-data state, enough to rebuild the queue in a new worker."""
        return {
            "max_size": self.max_size,
            "size": self.size,
            "ready": self.ready,
            "desc_addr": self.desc_addr,
            "avail_addr": self.avail_addr,
            "used_addr": self.used_addr,
            "next_avail": self.next_avail,
            "next_used": self.next_used,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load a `snapshot()`; raises ValueError if it was taken from a different queue."""
        if state["max_size"] != self.max_size:
            raise ValueError(f"snapshot is of a queue of max size {state['max_size']}, not {self.max_size}")
        self.size = int(state["size"])
        self.ready = bool(state["ready"])
        self.desc_addr = int(state["desc_addr"])
        self.avail_addr = int(state["avail_addr"])
        self.used_addr = int(state["used_addr"])
        self.next_avail = int(state["next_avail"]) & _U16_MASK
        self.next_used = int(state["next_used"]) & _U16_MASK
        self.event_idx = bool(state["event_idx"])
        self.indirect = bool(state["indirect"])
        self._num_added = 0

    def resync_from_used_ring(self) -> None:
        """Take our positions from the used ring in guest memory.

        For a worker restarted after a crash, whose last snapshot may be stale: chains it
        had popped but not completed are popped again. Only right for devices that
        complete chains in order (block does).
        """
        self.next_used = self._load16(self.used_addr + 2)
        self.next_avail = self.next_used
        self._num_added = 0

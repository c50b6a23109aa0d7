"""Descriptor chains: walked and validated once, then read and written with bounds checks.

A chain is walked when it is popped (`walk_chain`): every descriptor is copied out of guest
memory exactly once and checked right then, so a guest that rewrites the descriptor table
afterwards changes nothing we act on (no time-of-check/time-of-use gap). The *buffers* the
descriptors point at stay shared with the guest: `ChainReader`/`ChainWriter` hand out copies
or, for zero-copy I/O, memoryviews of them.

Every `ChainError` is the guest's fault: the chain is malformed or too short for what the
device needs. It fails that one request; the queue itself stays usable.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from shared.memory import GuestMemory, GuestMemoryError
from shared.virtio.constants import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
MAX_CHAIN_BYTES = 1 << 32  # spec 2.7.5.2: a chain is at most 2^32 bytes in total


class ChainError(Exception):
    """The guest gave a malformed descriptor chain, or one too small for the request."""

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"Guest gave a bad descriptor chain (head {head}): {reason}")
        self.head = head
        self.reason = reason


class Descriptor(NamedTuple):
    """One validated buffer: [addr, addr+length) lies in guest RAM. (A NamedTuple, not a
    dataclass: one is made per buffer on the data path, and tuples are the cheapest.)"""

    addr: int
    length: int
    writable: bool


class Segment(NamedTuple):
    """A guest address range, part of a descriptor's buffer."""

    addr: int
    length: int


@dataclass
class _Walk:
    """Where the walk is: which table, how many entries it has, whether it is indirect."""

    table: int
    entries: int
    indirect: bool = False


def _enter_indirect(mem: GuestMemory, walk: _Walk, head: int, addr: int, length: int, flags: int) -> None:
    """Switch the walk to the indirect table at `addr`, checking spec 2.7.5.3.1 first."""
    if walk.indirect:
        raise ChainError(head, "nested indirect descriptor")
    if flags & VIRTQ_DESC_F_NEXT:
        raise ChainError(head, "indirect descriptor also has NEXT set")
    if length == 0 or length % DESC_SIZE:
        raise ChainError(head, f"indirect table length {length} is not a non-zero multiple of 16")
    if not mem.contains(addr, length):
        raise ChainError(head, f"indirect table [{addr:#x}, +{length:#x}) is outside guest memory")
    walk.table, walk.entries, walk.indirect = addr, length // DESC_SIZE, True


def walk_chain(
    mem: GuestMemory,
    table: int,
    queue_size: int,
    head: int,
    *,
    indirect_ok: bool,
    table_offset: int | None = None,
) -> DescriptorChain:
    """Copy out and validate the chain starting at descriptor `head`.

    At most `queue_size` buffers are accepted (spec: a chain is never longer than the
    queue), which also ends any loop in the `next` links. Raises `ChainError`.
    `table_offset` is where the queue's descriptor table starts in the memfd, when the
    caller has checked that the whole table is in guest memory (`Queue` has): then a
    direct chain is walked without looking its descriptors up one by one.
    """
    if table_offset is not None and 0 <= head < queue_size:
        chain = _walk_direct(mem, table_offset, queue_size, head)
        if chain is not None:
            return chain
    return _walk(mem, table, queue_size, head, indirect_ok=indirect_ok)


def _walk_direct(mem: GuestMemory, table_offset: int, queue_size: int, head: int) -> DescriptorChain | None:
    """`walk_chain` for a chain without an indirect descriptor (None when it has one: the
    caller walks it again the general way, acting only on that second walk)."""
    view, offset_of, unpack_from = mem.view, mem.offset_of, _DESC.unpack_from
    descriptors: list[Descriptor] = []
    total = 0
    index = head
    last_writable = False
    while True:
        addr, length, flags, nxt = unpack_from(view, table_offset + index * DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT:
            return None
        writable = bool(flags & VIRTQ_DESC_F_WRITE)
        if last_writable and not writable:
            raise ChainError(head, "device-readable descriptor after a device-writable one")
        try:
            offset_of(addr, length)
        except GuestMemoryError:
            raise ChainError(head, f"buffer [{addr:#x}, +{length:#x}) is outside guest memory") from None
        descriptors.append(Descriptor(addr, length, writable))
        last_writable = writable
        total += length
        if total > MAX_CHAIN_BYTES:
            raise ChainError(head, "chain is longer than 2^32 bytes")
        if not flags & VIRTQ_DESC_F_NEXT:
            return DescriptorChain(mem, head, tuple(descriptors))
        if len(descriptors) >= queue_size:
            raise ChainError(head, f"chain has more than {queue_size} descriptors (a loop?)")
        if nxt >= queue_size:
            raise ChainError(head, f"next index {nxt} is out of range (table has {queue_size})")
        index = nxt


def _walk(mem: GuestMemory, table: int, queue_size: int, head: int, *, indirect_ok: bool) -> DescriptorChain:
    """`walk_chain`, descriptor by descriptor, indirect tables included."""
    walk = _Walk(table, queue_size)
    descriptors: list[Descriptor] = []
    total = 0
    index = head
    view, offset_of, unpack_from = mem.view, mem.offset_of, _DESC.unpack_from
    last_writable = False
    while True:
        try:
            addr, length, flags, nxt = unpack_from(view, offset_of(walk.table + index * DESC_SIZE, DESC_SIZE))
        except GuestMemoryError as e:
            raise ChainError(head, f"descriptor {index} lies outside guest memory") from e
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not indirect_ok:
                raise ChainError(head, "indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")
            _enter_indirect(mem, walk, head, addr, length, flags)
            index = 0
            continue
        writable = bool(flags & VIRTQ_DESC_F_WRITE)
        if last_writable and not writable:
            raise ChainError(head, "device-readable descriptor after a device-writable one")
        try:
            offset_of(addr, length)
        except GuestMemoryError:
            raise ChainError(head, f"buffer [{addr:#x}, +{length:#x}) is outside guest memory") from None
        descriptors.append(Descriptor(addr, length, writable))
        last_writable = writable
        total += length
        if total > MAX_CHAIN_BYTES:
            raise ChainError(head, "chain is longer than 2^32 bytes")
        if not flags & VIRTQ_DESC_F_NEXT:
            return DescriptorChain(mem, head, tuple(descriptors))
        if len(descriptors) >= queue_size:
            raise ChainError(head, f"chain has more than {queue_size} descriptors (a loop?)")
        if nxt >= walk.entries:
            raise ChainError(head, f"next index {nxt} is out of range (table has {walk.entries})")
        index = nxt


class DescriptorChain:
    """A popped, validated chain: readable descriptors first, then writable ones."""

    def __init__(self, mem: GuestMemory, head: int, descriptors: tuple[Descriptor, ...]) -> None:
        self.mem = mem
        self.head = head
        self.descriptors = descriptors
        # Readable descriptors come first (walk_chain checks it): split and sum once; the
        # tuples are for the data path (`readable`/`writable` hand out lists to change).
        split = len(descriptors)
        for i, desc in enumerate(descriptors):
            if desc.writable:
                split = i
                break
        self.readable_descs = descriptors[:split]
        self.writable_descs = descriptors[split:]
        self.readable_len = sum(d.length for d in self.readable_descs)
        self.writable_len = sum(d.length for d in self.writable_descs)

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors)

    def __len__(self) -> int:
        return len(self.descriptors)

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, descriptors={list(self.descriptors)!r})"

    @property
    def readable(self) -> list[Descriptor]:
        return list(self.readable_descs)

    @property
    def writable(self) -> list[Descriptor]:
        return list(self.writable_descs)

    def reader(self) -> ChainReader:
        return ChainReader(self)

    def writer(self) -> ChainWriter:
        return ChainWriter(self)


class _Cursor:
    """A position in a list of buffers; hands out the next n bytes as segments."""

    def __init__(self, chain: DescriptorChain, buffers: Sequence[Descriptor], total: int) -> None:
        self._chain = chain
        self._buffers = buffers
        self._index = 0
        self._offset = 0
        self.consumed = 0
        self.remaining = total

    def take(self, n: int) -> list[Segment]:
        """The next `n` bytes as segments; ChainError (guest's fault) if fewer remain."""
        if n < 0:
            raise ValueError("negative length")
        if n > self.remaining:
            raise ChainError(self._chain.head, f"needs {n} more bytes, the buffers hold {self.remaining}")
        segments: list[Segment] = []
        while n:
            desc = self._buffers[self._index]
            step = min(n, desc.length - self._offset)
            if step:
                segments.append(Segment(desc.addr + self._offset, step))
            self._advance(step)
            n -= step
        return segments

    def _advance(self, step: int) -> None:
        self._offset += step
        self.consumed += step
        self.remaining -= step
        if self._offset == self._buffers[self._index].length:
            self._index += 1
            self._offset = 0

    def views(self, n: int) -> list[memoryview]:
        mem_slice = self._chain.mem.slice
        return [mem_slice(addr, length) for addr, length in self.take(n)]


class ChainReader:
    """Reads the chain's device-readable buffers front to back."""

    def __init__(self, chain: DescriptorChain) -> None:
        self._cursor = _Cursor(chain, chain.readable_descs, chain.readable_len)

    @property
    def remaining(self) -> int:
        return self._cursor.remaining

    @property
    def bytes_read(self) -> int:
        return self._cursor.consumed

    def read(self, n: int) -> bytes:
        """Copy exactly `n` bytes out (a copy: safe to validate and act on)."""
        return b"".join(bytes(v) for v in self._cursor.views(n))

    def segments(self, n: int) -> list[Segment]:
        """The next `n` bytes as guest address ranges."""
        return self._cursor.take(n)

    def views(self, n: int) -> list[memoryview]:
        """The next `n` bytes as views of guest memory, for pwritev (zero copy)."""
        return self._cursor.views(n)

    def skip(self, n: int) -> None:
        self._cursor.take(n)


class ChainWriter:
    """Writes into the chain's device-writable buffers front to back."""

    def __init__(self, chain: DescriptorChain) -> None:
        self._cursor = _Cursor(chain, chain.writable_descs, chain.writable_len)

    @property
    def remaining(self) -> int:
        return self._cursor.remaining

    @property
    def bytes_written(self) -> int:
        """Bytes handed out so far: the `len` to put in the used ring."""
        return self._cursor.consumed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Copy all of `data` in; ChainError if the buffers are too small."""
        data = memoryview(data).cast("B")
        pos = 0
        for view in self._cursor.views(len(data)):
            view[:] = data[pos : pos + len(view)]
            pos += len(view)

    def segments(self, n: int) -> list[Segment]:
        """The next `n` bytes as guest address ranges."""
        return self._cursor.take(n)

    def views(self, n: int) -> list[memoryview]:
        """The next `n` bytes as views of guest memory, for preadv (zero copy)."""
        return self._cursor.views(n)

    def skip(self, n: int) -> None:
        self._cursor.take(n)

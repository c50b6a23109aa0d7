"""A device's durable state area: a small memfd shared by its worker and the supervisor.

The supervisor creates one per virtio device and keeps it for the microVM's life; each
worker of that device (the first one and every replacement) maps it. The worker writes
its transport snapshot (`MmioTransport.snapshot()`: status, negotiated features, queue
addresses and sizes) there synchronously whenever that state changes, so a worker killed
at any instant leaves the last state the guest saw; a replacement worker reads it back and
takes the ring positions from guest memory (`restore(resync=True)`). Like vhost-user's
inflight area, it lives outside the process that may die.

Layout (little endian):

    0    u32 magic "EMST", u32 version, u32 active slot (0/1), u32 reserved
    16   u32 fatal fault: a FATAL_* code written by a worker just before an injected
         crash or hang, read and cleared by the supervisor (the restart's cause)
    64   u32 per queue (up to MAX_QUEUES): 0x10000 | the queue's next_avail after its last
         pop, written on every pop; with the used index in guest memory it tells a
         replacement which chains were in flight (`in_flight`)
    4096 slot 0: u32 length, u32 crc32, u64 generation, msgpack payload
    4096 + SLOT_BYTES: slot 1, same
    EXT_OFFSET (64 KiB): EXT_BYTES for a device's own fixed-layout records, written in place
         (vsock: its connection table, `devices.vsock.durable`); zero until used (the memfd
         is sparse: a device that does not use it costs nothing)

A write goes to the inactive slot, then flips `active`: a worker killed mid-write leaves
the previous snapshot readable, and a torn slot fails its crc and is ignored.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from typing import Any

import msgpack

MAGIC = 0x54534D45  # "EMST"
VERSION = 1
HEADER = struct.Struct("<IIII")
FATAL = struct.Struct("<I")
FATAL_OFFSET = 16
SLOT_HEADER = struct.Struct("<IIQ")
SLOTS_OFFSET = 4096
SLOT_BYTES = 30 * 1024
EXT_OFFSET = SLOTS_OFFSET + 2 * SLOT_BYTES
EXT_BYTES = 1024 * 1024
AREA_BYTES = EXT_OFFSET + EXT_BYTES

POPPED = struct.Struct("<I")
POPPED_OFFSET = 64
MAX_QUEUES = 64

FATAL_NONE, FATAL_CRASH, FATAL_HANG = 0, 1, 2
FATAL_NAMES = {FATAL_CRASH: "crash", FATAL_HANG: "hang"}


class StateAreaError(Exception):
    """A snapshot does not fit the area."""


def create_state_memfd(name: str) -> int:
    """A zeroed state area (the supervisor's; close it when the microVM ends)."""
    fd = os.memfd_create(f"embervm-{name}-state"[:249], os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, AREA_BYTES)
    except OSError:
        os.close(fd)
        raise
    return fd


class StateArea:
    """A mapping of one device's state area (worker side: map it before the seccomp filter)."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, AREA_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._generation = 0
        magic, _version, _active, _ = HEADER.unpack_from(self._map, 0)
        if magic != MAGIC:
            HEADER.pack_into(self._map, 0, MAGIC, VERSION, 0, 0)
        else:
            self._generation = max(self._slot_generation(0), self._slot_generation(1))

    def _slot_generation(self, slot: int) -> int:
        return int(SLOT_HEADER.unpack_from(self._map, SLOTS_OFFSET + slot * SLOT_BYTES)[2])

    def write(self, state: dict[str, Any]) -> None:
        payload = msgpack.packb(state, use_bin_type=True)
        if len(payload) > SLOT_BYTES - SLOT_HEADER.size:
            raise StateAreaError(f"device state of {len(payload)} bytes does not fit the state area")
        active = HEADER.unpack_from(self._map, 0)[2]
        slot = 1 - active
        base = SLOTS_OFFSET + slot * SLOT_BYTES
        self._generation += 1
        self._map[base + SLOT_HEADER.size : base + SLOT_HEADER.size + len(payload)] = payload
        SLOT_HEADER.pack_into(self._map, base, len(payload), zlib.crc32(payload), self._generation)
        HEADER.pack_into(self._map, 0, MAGIC, VERSION, slot, 0)

    def ext(self) -> memoryview:
        """The device's own region (EXT_BYTES), written in place by the device."""
        return memoryview(self._map)[EXT_OFFSET:AREA_BYTES]

    def read(self) -> dict[str, Any] | None:
        """The latest intact snapshot, or None when there is none."""
        return read_state(bytes(self._map))

    def set_fatal(self, code: int) -> None:
        FATAL.pack_into(self._map, FATAL_OFFSET, code)

    def set_popped(self, queue: int, next_avail: int) -> None:
        if queue < MAX_QUEUES:
            POPPED.pack_into(self._map, POPPED_OFFSET + 4 * queue, 0x10000 | (next_avail & 0xFFFF))

    def popped(self, queue: int) -> int | None:
        """The dead worker's next_avail of `queue` after its last pop, if it popped any."""
        if queue >= MAX_QUEUES:
            return None
        value = int(POPPED.unpack_from(self._map, POPPED_OFFSET + 4 * queue)[0])
        return value & 0xFFFF if value & 0x10000 else None

    def in_flight(self, queue: int, next_used: int, size: int) -> int:
        """How many chains of `queue`, from used index `next_used` on, the dead worker had
        popped and not completed (for a device that completes in ring order)."""
        popped = self.popped(queue)
        if popped is None:
            return 0
        count = (popped - next_used) & 0xFFFF
        return count if count <= size else 0

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()


def read_state(area: bytes) -> dict[str, Any] | None:
    """The latest intact snapshot in a copy of the area (the active slot, else the other)."""
    if len(area) < EXT_OFFSET:
        return None
    magic, version, active, _ = HEADER.unpack_from(area, 0)
    if magic != MAGIC or version != VERSION:
        return None
    for slot in (active & 1, 1 - (active & 1)):
        base = SLOTS_OFFSET + slot * SLOT_BYTES
        length, crc, generation = SLOT_HEADER.unpack_from(area, base)
        if generation == 0 or length > SLOT_BYTES - SLOT_HEADER.size:
            continue
        payload = area[base + SLOT_HEADER.size : base + SLOT_HEADER.size + length]
        if zlib.crc32(payload) != crc:
            continue
        with contextlib.suppress(Exception):
            state = msgpack.unpackb(payload, raw=False)
            if isinstance(state, dict):
                return state
    return None


def read_area(fd: int) -> bytes:
    """The supervisor's copy of a state area's header and slots (not the device's region)."""
    return os.pread(fd, EXT_OFFSET, 0)


def take_fatal(fd: int) -> int:
    """Supervisor: the fatal-fault code a dead worker left (and clear it)."""
    code = int(FATAL.unpack(os.pread(fd, FATAL.size, FATAL_OFFSET))[0])
    if code:
        os.pwrite(fd, FATAL.pack(FATAL_NONE), FATAL_OFFSET)
    return code

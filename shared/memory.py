"""Guest memory: one sealed memfd, mapped by every process that needs it.

The supervisor creates the memfd (`create_guest_memfd`); the vCPU worker and device
workers receive its fd and map it (`GuestMemory.map`). All access to guest memory goes
through the bounds-checked accessors below: a guest address outside RAM raises
`GuestMemoryError`, it never reaches host memory outside the mapping.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Sequence

from shared.dirty import DirtyLog
from shared.layout import MemoryRegion, ram_regions

F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL = 0x1
F_SEAL_SHRINK = 0x2
F_SEAL_GROW = 0x4


class GuestMemoryError(Exception):
    """An access to guest memory fell (partly) outside guest RAM."""

    def __init__(self, addr: int, length: int) -> None:
        super().__init__(f"guest address range [{addr:#x}, +{length:#x}) is outside guest memory")
        self.addr = addr
        self.length = length


def create_guest_memfd(size: int, name: str = "embervm-guest-mem") -> int:
    """Create the guest RAM memfd of `size` bytes, sealed so that no holder can resize it.

    A worker that could shrink the file would make every other mapping fault (SIGBUS);
    sealing SHRINK and GROW, then SEAL itself, rules that out for every fd holder.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def resident_bytes(memfd: int) -> int:
    """Bytes of the guest-memory memfd that hold pages now (what the host really spends on
    guest RAM: pages never touched, or given back by the balloon, cost nothing)."""
    return os.fstat(memfd).st_blocks * 512


class GuestMemory:
    """Bounds-checked access to guest RAM through a shared mapping of the memfd."""

    def __init__(self, mapping: mmap.mmap, regions: Sequence[MemoryRegion]) -> None:
        self._map = mapping
        self._view = memoryview(mapping)
        # Word views for fields the guest reads while we write them (ring indices): an item
        # store is one aligned store. (struct.pack_into is not: it zeroes the field first.)
        self._view16 = self._view.cast("H") if len(mapping) % 8 == 0 else None
        self._view32 = self._view.cast("I") if len(mapping) % 8 == 0 else None
        self._view64 = self._view.cast("Q") if len(mapping) % 8 == 0 else None
        self.regions = tuple(regions)
        self.dirty: DirtyLog | None = None  # a device worker's write log (track_dirty_pages)
        # The first region starts at guest address 0 at file offset 0 (shared.layout): the
        # data path's addresses mostly fall in it, and there the offset is the address.
        first = self.regions[0] if self.regions else None
        self._low_end = first.end if first is not None and first.guest_addr == 0 and first.file_offset == 0 else 0

    @property
    def view(self) -> memoryview:
        """The whole mapping (memfd offsets, see `offset_of`), for `struct.unpack_from`."""
        return self._view

    @property
    def view16(self) -> memoryview:
        """The whole mapping as u16 words: item offset // 2 is one aligned load or store."""
        if self._view16 is None:
            raise GuestMemoryError(0, len(self._map))
        return self._view16

    @property
    def view32(self) -> memoryview:
        """The whole mapping as u32 words (item offset // 4)."""
        if self._view32 is None:
            raise GuestMemoryError(0, len(self._map))
        return self._view32

    @classmethod
    def map(cls, memfd: int, mem_size: int) -> GuestMemory:
        """Map the whole memfd shared, with the region layout for `mem_size` bytes."""
        actual = os.fstat(memfd).st_size
        if actual != mem_size:
            raise ValueError(f"memfd holds {actual} bytes, expected {mem_size}")
        mapping = mmap.mmap(memfd, mem_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # Transparent huge pages for the guest's RAM where the host allows them for shmem
        # (shmem_enabled=advise): measured one level down, 4 KiB pages made a Linux boot
        # ~1.7x slower than QEMU's THP-backed memory.
        with contextlib.suppress(OSError):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        return cls(mapping, ram_regions(mem_size))

    @property
    def size(self) -> int:
        return len(self._map)

    @property
    def host_mapping(self) -> mmap.mmap:
        """The mmap object itself (for KVM memory slots, which need its host address)."""
        return self._map

    def close(self) -> None:
        for view in (self._view16, self._view32, self._view64):
            if view is not None:
                view.release()
        self._view.release()
        self._map.close()

    def offset_of(self, addr: int, length: int) -> int:
        """memfd offset of guest range [addr, addr+length), which must lie in one region."""
        if addr >= 0 and length >= 0 and addr + length <= self._low_end:
            return addr
        if addr < 0 or length < 0:
            raise GuestMemoryError(addr, length)
        for region in self.regions:
            if region.guest_addr <= addr and addr + length <= region.end:
                return region.file_offset + (addr - region.guest_addr)
        raise GuestMemoryError(addr, length)

    def contains(self, addr: int, length: int) -> bool:
        """True when [addr, addr+length) lies in guest RAM."""
        try:
            self.offset_of(addr, length)
        except GuestMemoryError:
            return False
        return True

    def slice(self, addr: int, length: int) -> memoryview:
        """A writable view of guest range [addr, addr+length), for zero-copy I/O.

        The guest can change the bytes under the view at any time: copy out what
        must be validated before acting on it.
        """
        start = self.offset_of(addr, length)
        if self.dirty is not None:
            self.dirty.mark(start, length)
        return self._view[start : start + length]

    def read(self, addr: int, length: int) -> bytes:
        """Copy `length` bytes out of guest memory."""
        start = self.offset_of(addr, length)
        return self._view[start : start + length].tobytes()

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` into guest memory at `addr`."""
        start = self.offset_of(addr, len(data))
        if self.dirty is not None:
            self.dirty.mark(start, len(data))
        self._view[start : start + len(data)] = data

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        """Set [addr, addr+length) to `byte`."""
        view = self.slice(addr, length)
        view[:] = bytes([byte]) * length

    # Fixed-size fields: an aligned one is read or written as one word of its width through
    # the word views (x86-64 is little endian, as virtio is), so the guest never sees a
    # ring index half-written; an unaligned one is copied as bytes.

    def read_u8(self, addr: int) -> int:
        return self._view[self.offset_of(addr, 1)]

    def read_u16(self, addr: int) -> int:
        offset = self.offset_of(addr, 2)
        if offset & 1 or self._view16 is None:
            return int.from_bytes(self._view[offset : offset + 2], "little")
        return int(self._view16[offset >> 1])

    def read_u32(self, addr: int) -> int:
        offset = self.offset_of(addr, 4)
        if offset & 3 or self._view32 is None:
            return int.from_bytes(self._view[offset : offset + 4], "little")
        return int(self._view32[offset >> 2])

    def read_u64(self, addr: int) -> int:
        offset = self.offset_of(addr, 8)
        if offset & 7 or self._view64 is None:
            return int.from_bytes(self._view[offset : offset + 8], "little")
        return int(self._view64[offset >> 3])

    def write_u8(self, addr: int, value: int) -> None:
        offset = self.offset_of(addr, 1)
        if self.dirty is not None:
            self.dirty.mark(offset, 1)
        self._view[offset] = value

    def write_u16(self, addr: int, value: int) -> None:
        offset = self.offset_of(addr, 2)
        if self.dirty is not None:
            self.dirty.mark(offset, 2)
        if offset & 1 or self._view16 is None:
            self._view[offset : offset + 2] = value.to_bytes(2, "little")
        else:
            self._view16[offset >> 1] = value

    def write_u32(self, addr: int, value: int) -> None:
        offset = self.offset_of(addr, 4)
        if self.dirty is not None:
            self.dirty.mark(offset, 4)
        if offset & 3 or self._view32 is None:
            self._view[offset : offset + 4] = value.to_bytes(4, "little")
        else:
            self._view32[offset >> 2] = value

    def write_u64(self, addr: int, value: int) -> None:
        offset = self.offset_of(addr, 8)
        if self.dirty is not None:
            self.dirty.mark(offset, 8)
        if offset & 7 or self._view64 is None:
            self._view[offset : offset + 8] = value.to_bytes(8, "little")
        else:
            self._view64[offset >> 3] = value

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
        self.regions = tuple(regions)

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
        self._view.release()
        self._map.close()

    def offset_of(self, addr: int, length: int) -> int:
        """memfd offset of guest range [addr, addr+length), which must lie in one region."""
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
        return self._view[start : start + length]

    def read(self, addr: int, length: int) -> bytes:
        """Copy `length` bytes out of guest memory."""
        return bytes(self.slice(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` into guest memory at `addr`."""
        self.slice(addr, len(data))[:] = data

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        """Set [addr, addr+length) to `byte`."""
        view = self.slice(addr, length)
        view[:] = bytes([byte]) * length

    def read_u8(self, addr: int) -> int:
        return self.slice(addr, 1)[0]

    def read_u16(self, addr: int) -> int:
        return int.from_bytes(self.slice(addr, 2), "little")

    def read_u32(self, addr: int) -> int:
        return int.from_bytes(self.slice(addr, 4), "little")

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.slice(addr, 8), "little")

    def write_u8(self, addr: int, value: int) -> None:
        self.slice(addr, 1)[0] = value

    def write_u16(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(2, "little"))

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(4, "little"))

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(8, "little"))

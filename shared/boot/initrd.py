"""Where the initrd goes: as high in low RAM as the kernel accepts, above the kernel.

Placing it high keeps it clear of the kernel's decompression buffer and of KASLR's
choices low in memory, like other boot loaders do (boot.rst: "the initrd should
typically be located as high in memory as possible").
"""

from __future__ import annotations

from shared.boot.errors import BootError
from shared.boot.kernel import mib
from shared.layout import MMIO_GAP_START
from shared.memory import GuestMemory

PAGE_SIZE = 0x1000


def place_initrd(mem: GuestMemory, size: int, kernel_end: int, initrd_addr_max: int) -> int:
    """Guest address for an initrd of `size` bytes.

    The initrd ends at or below the end of the first RAM region (below the 32-bit
    MMIO gap) and at or below `initrd_addr_max` + 1, starts 4 KiB aligned, and does
    not reach below `kernel_end`.
    """
    if size <= 0:
        raise BootError(f"initrd is empty ({size} bytes)")
    low_ram_end = min(mem.regions[0].end, MMIO_GAP_START)
    end = min(low_ram_end, initrd_addr_max + 1)
    start = (end - size) & ~(PAGE_SIZE - 1)
    lowest = -(-kernel_end // PAGE_SIZE) * PAGE_SIZE
    if start < lowest:
        raise BootError(
            f"initrd of {mib(size)} MiB does not fit in guest memory of {mib(mem.size)} MiB "
            f"(it must lie between the kernel's end {lowest:#x} and {end:#x})"
        )
    return start


def load_initrd(mem: GuestMemory, data: bytes, kernel_end: int, initrd_addr_max: int) -> tuple[int, int]:
    """Place and write the initrd; returns its (guest address, size)."""
    addr = place_initrd(mem, len(data), kernel_end, initrd_addr_max)
    mem.write(addr, data)
    return addr, len(data)

"""What loading a kernel image produced, and the checks every loader shares."""

from __future__ import annotations

from dataclasses import dataclass

from shared.boot.errors import BootError
from shared.layout import HIMEM_START, MiB
from shared.memory import GuestMemory

# boot.rst: a kernel whose header predates initrd_addr_max (protocol < 2.03) takes an
# initrd up to this address; an ELF vmlinux has no header, so the same bound applies.
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF


@dataclass(frozen=True)
class LoadedKernel:
    """A kernel written into guest memory.

    `start`..`end` is every byte the kernel claims, including room it needs beyond
    the image (bss, or a bzImage's decompression buffer): nothing else goes there.
    `setup_header` holds the bzImage setup-header bytes (from 0x1f1) to copy into the
    zero page, or None for an ELF vmlinux, whose header the zero page synthesizes.
    """

    entry: int
    start: int
    end: int
    setup_header: bytes | None
    initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX
    cmdline_size: int | None = None  # the kernel's limit, without the NUL; None: unknown


def mib(size: int) -> str:
    """`size` bytes as MiB for messages: whole when exact, else one decimal."""
    return f"{size // MiB}" if size % MiB == 0 else f"{size / MiB:.1f}"


def check_kernel_range(mem: GuestMemory, what: str, start: int, end: int) -> None:
    """Raise unless [start, end) lies in guest RAM at or above HIMEM_START.

    Below 1 MiB live the zero page, command line, page tables, GDT and the firmware
    tables; a kernel part there would be overwritten by them (or overwrite them).
    """
    if start < HIMEM_START:
        raise BootError(f"{what} [{start:#x}, {end:#x}) overlaps the boot structures below {HIMEM_START:#x}")
    if end < start or not mem.contains(start, end - start):
        raise BootError(f"{what} [{start:#x}, {end:#x}) does not fit in guest memory ({mib(mem.size)} MiB)")

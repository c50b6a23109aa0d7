"""The zero page (`struct boot_params`): the 4 KiB block the kernel reads at entry.

Offsets follow Documentation/arch/x86/zero-page.rst and boot.rst. For a bzImage the
kernel's own setup header is copied in; for an ELF vmlinux (which has none) a minimal
one is synthesized, as Firecracker does. The loader then fills the fields a boot
loader owns: loader type, command line, initrd, e820 map and the ACPI RSDP address.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from shared.boot.bzimage import (
    BOOT_FLAG_MAGIC,
    FIELD_OFFSETS,
    HDRS_MAGIC,
    LOADED_HIGH,
    SETUP_HEADER_OFFSET,
)
from shared.boot.errors import BootError
from shared.layout import ZERO_PAGE_START
from shared.memory import GuestMemory

ZERO_PAGE_SIZE = 0x1000

# zero-page.rst offsets outside the setup header.
ACPI_RSDP_ADDR = 0x070  # u64
EXT_RAMDISK_IMAGE = 0x0C0  # u32, bits 63:32 of ramdisk_image
EXT_RAMDISK_SIZE = 0x0C4  # u32, bits 63:32 of ramdisk_size
EXT_CMD_LINE_PTR = 0x0C8  # u32, bits 63:32 of cmd_line_ptr
E820_ENTRIES = 0x1E8  # u8
SENTINEL = 0x1EF  # u8, must stay 0 (see boot.rst "sentinel")
EDD_MBR_SIG_BUFFER = 0x290  # first field after the setup header area
E820_TABLE = 0x2D0  # struct boot_e820_entry[128]
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type: 20 bytes, packed
E820_MAX_ENTRIES = 128

# Setup-header fields the loader writes (absolute zero-page offsets).
TYPE_OF_LOADER = FIELD_OFFSETS["type_of_loader"]
LOADFLAGS = FIELD_OFFSETS["loadflags"]
RAMDISK_IMAGE = FIELD_OFFSETS["ramdisk_image"]
RAMDISK_SIZE = FIELD_OFFSETS["ramdisk_size"]
CMD_LINE_PTR = FIELD_OFFSETS["cmd_line_ptr"]
CMDLINE_SIZE = FIELD_OFFSETS["cmdline_size"]
BOOT_FLAG = FIELD_OFFSETS["boot_flag"]
HEADER = FIELD_OFFSETS["header"]
KERNEL_ALIGNMENT = FIELD_OFFSETS["kernel_alignment"]

LOADER_TYPE_UNDEFINED = 0xFF  # boot.rst: "0xFF means no assigned ID"
ELF_KERNEL_ALIGNMENT = 0x1000000  # what Firecracker puts in a synthesized header


def _put(page: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into("<" + fmt, page, offset, value)


def _split64(value: int, what: str) -> tuple[int, int]:
    if not 0 <= value < 1 << 64:
        raise BootError(f"{what} {value:#x} is not a 64-bit guest address")
    return value & 0xFFFFFFFF, value >> 32


def build_zero_page(
    setup_header: bytes | None,
    cmdline_addr: int,
    e820: Sequence[tuple[int, int, int]],
    initrd: tuple[int, int] | None = None,
    acpi_rsdp: int | None = None,
    cmdline_max: int | None = None,
) -> bytearray:
    """Build the 4 KiB zero page.

    `setup_header` is the bzImage header bytes from 0x1f1, or None for an ELF kernel.
    `initrd` is (guest address, size); `e820` is (addr, size, type) entries;
    `cmdline_max` (command-line limit without the NUL) goes into a synthesized header.
    """
    page = bytearray(ZERO_PAGE_SIZE)
    if setup_header is not None:
        if SETUP_HEADER_OFFSET + len(setup_header) > EDD_MBR_SIG_BUFFER:
            raise BootError(f"bzImage setup header is {len(setup_header)} bytes, too long for the zero page")
        page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(setup_header)] = setup_header
    else:
        _put(page, BOOT_FLAG, "H", BOOT_FLAG_MAGIC)
        page[HEADER : HEADER + 4] = HDRS_MAGIC
        _put(page, KERNEL_ALIGNMENT, "I", ELF_KERNEL_ALIGNMENT)
        page[LOADFLAGS] |= LOADED_HIGH
        if cmdline_max is not None:
            _put(page, CMDLINE_SIZE, "I", cmdline_max)
    page[SENTINEL] = 0
    page[TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED

    low, high = _split64(cmdline_addr, "command line address")
    _put(page, CMD_LINE_PTR, "I", low)
    _put(page, EXT_CMD_LINE_PTR, "I", high)

    if initrd is not None:
        addr, size = initrd
        low, high = _split64(addr, "initrd address")
        _put(page, RAMDISK_IMAGE, "I", low)
        _put(page, EXT_RAMDISK_IMAGE, "I", high)
        low, high = _split64(size, "initrd size")
        _put(page, RAMDISK_SIZE, "I", low)
        _put(page, EXT_RAMDISK_SIZE, "I", high)

    if len(e820) > E820_MAX_ENTRIES:
        raise BootError(f"e820 map has {len(e820)} entries, the zero page holds {E820_MAX_ENTRIES}")
    page[E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        E820_ENTRY.pack_into(page, E820_TABLE + i * E820_ENTRY.size, addr, size, kind)

    if acpi_rsdp is not None:
        _split64(acpi_rsdp, "ACPI RSDP address")
        _put(page, ACPI_RSDP_ADDR, "Q", acpi_rsdp)
    return page


def write_zero_page(mem: GuestMemory, page: bytes | bytearray, addr: int = ZERO_PAGE_START) -> None:
    """Write a built zero page into guest memory (at ZERO_PAGE_START by default)."""
    if len(page) != ZERO_PAGE_SIZE:
        raise BootError(f"zero page is {len(page)} bytes, expected {ZERO_PAGE_SIZE}")
    mem.write(addr, page)

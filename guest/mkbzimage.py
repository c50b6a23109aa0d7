"""Wrap the guest's flat binary into a bzImage (Linux x86 boot protocol 2.15).

The flat binary is the ELF flattened from its load address, 1 MiB
(`objcopy -O binary`); it becomes the bzImage's protected-mode part unchanged
(padded to 16 bytes). In front of it go a boot sector and setup sectors that
hold a valid setup header at 0x1f1. The real-mode code is only a halt loop:
loaders that use the 64-bit entry (load address + 0x200) never run it.

Usage: python -m guest.mkbzimage FLAT_BIN OUT_BZIMAGE [--bss-size N]
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

SECTOR = 512
SETUP_SECTS = 4  # the traditional minimum; 0 in the header would also mean 4
LOAD_ADDRESS = 0x100000
BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
PROTOCOL_VERSION = 0x020F
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
CMDLINE_SIZE = 2047
KERNEL_ALIGNMENT = 0x100000  # we load at exactly 1 MiB, not relocatable
INITRD_ADDR_MAX = 0x7FFFFFFF
NORMAL_VGA = 0xFFFF
KERNEL_INFO_OFFSET = 0x100  # where start.S puts "LToP", from the image start
KERNEL_INFO_MAGIC = b"LToP"
ENTRY64_OFFSET = 0x200
HEADER_END = 0x26C  # one past kernel_info_offset

# Real-mode code: `cli; hlt; jmp .-1` (we are never started in real mode).
_REAL_MODE_HALT = bytes([0xFA, 0xF4, 0xEB, 0xFD])


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def make_bzimage(flat: bytes, bss_size: int) -> bytes:
    """The bzImage for `flat` (the image from 1 MiB) whose .bss/stack take `bss_size` more bytes."""
    if bss_size < 0:
        raise ValueError("bss_size must not be negative")
    if len(flat) <= ENTRY64_OFFSET:
        raise ValueError(f"flat image of {len(flat)} bytes has no 64-bit entry at +{ENTRY64_OFFSET:#x}")
    protected = flat + bytes(_align(len(flat), 16) - len(flat))
    syssize = len(protected) // 16
    init_size = _align(len(flat) + bss_size, 4096)
    kernel_info = KERNEL_INFO_OFFSET if flat[KERNEL_INFO_OFFSET : KERNEL_INFO_OFFSET + 4] == KERNEL_INFO_MAGIC else 0

    setup = bytearray((SETUP_SECTS + 1) * SECTOR)
    setup[0 : len(_REAL_MODE_HALT)] = _REAL_MODE_HALT
    # 0x200 is `jmp short` over the header, to a halt loop.
    setup[HEADER_END : HEADER_END + len(_REAL_MODE_HALT)] = _REAL_MODE_HALT

    def put(offset: int, fmt: str, value: int | bytes) -> None:
        struct.pack_into("<" + fmt, setup, offset, value)

    put(0x1F1, "B", SETUP_SECTS)  # setup_sects
    put(0x1F2, "H", 0)  # root_flags
    put(0x1F4, "I", syssize)  # syssize, 16-byte units
    put(0x1FA, "H", NORMAL_VGA)  # vid_mode
    put(0x1FE, "H", BOOT_FLAG)  # boot_flag
    put(0x200, "2s", bytes([0xEB, HEADER_END - 0x202]))  # jump
    put(0x202, "4s", HDRS_MAGIC)  # header
    put(0x206, "H", PROTOCOL_VERSION)  # version
    put(0x211, "B", LOADED_HIGH)  # loadflags
    put(0x214, "I", LOAD_ADDRESS)  # code32_start
    put(0x22C, "I", INITRD_ADDR_MAX)  # initrd_addr_max
    put(0x230, "I", KERNEL_ALIGNMENT)  # kernel_alignment
    put(0x234, "B", 0)  # relocatable_kernel
    put(0x235, "B", 20)  # min_alignment, log2 (1 MiB)
    put(0x236, "H", XLF_KERNEL_64)  # xloadflags
    put(0x238, "I", CMDLINE_SIZE)  # cmdline_size
    put(0x248, "I", 0)  # payload_offset
    put(0x24C, "I", 0)  # payload_length
    put(0x258, "Q", LOAD_ADDRESS)  # pref_address
    put(0x260, "I", init_size)  # init_size
    put(0x264, "I", 0)  # handover_offset: no EFI handover
    put(0x268, "I", kernel_info)  # kernel_info_offset
    return bytes(setup) + protected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("flat", type=Path, help="flat binary, objcopy -O binary of the guest ELF")
    parser.add_argument("out", type=Path, help="bzImage to write")
    parser.add_argument("--bss-size", type=lambda s: int(s, 0), default=0, help="bytes of .bss past the image")
    args = parser.parse_args(argv)
    args.out.write_bytes(make_bzimage(args.flat.read_bytes(), args.bss_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())

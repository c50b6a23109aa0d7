"""The real-mode setup header of a bzImage (Documentation/arch/x86/boot.rst).

A bzImage is a small real-mode setup program followed by the protected-mode kernel
(a self-decompressing stub plus its compressed payload). The setup header at file
offset 0x1f1 tells a boot loader where the protected-mode part starts and what the
kernel needs; its bytes are also copied into the zero page for the kernel to read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shared.boot.errors import BootError
from shared.boot.kernel import LoadedKernel, check_kernel_range, mib
from shared.layout import HIMEM_START
from shared.memory import GuestMemory

SETUP_HEADER_OFFSET = 0x1F1
# The header ends at 0x202 + the byte at 0x201 (the jump offset of the header's
# leading short jump), per boot.rst "the end of the setup header can be calculated".
SETUP_HEADER_JUMP_OFFSET = 0x201
HDRS_MAGIC = b"HdrS"
HDRS_OFFSET = 0x202
BOOT_FLAG_MAGIC = 0xAA55
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4 (boot.rst)
SECTOR_SIZE = 512

# loadflags
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80

# xloadflags
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

# The 64-bit entry point is 0x200 bytes into the protected-mode code (boot.rst,
# "64-bit Boot Protocol").
ENTRY_64_OFFSET = 0x200
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, and so XLF_KERNEL_64, exist from here on

# Field offsets (absolute, in the file and in the zero page).
_U8, _U16, _U32, _U64 = "B", "H", "I", "Q"
_FIELDS: dict[str, tuple[int, str]] = {
    "setup_sects": (0x1F1, _U8),
    "root_flags": (0x1F2, _U16),
    "syssize": (0x1F4, _U32),
    "vid_mode": (0x1FA, _U16),
    "root_dev": (0x1FC, _U16),
    "boot_flag": (0x1FE, _U16),
    "jump": (0x200, _U16),
    "header": (0x202, _U32),
    "version": (0x206, _U16),
    "kernel_version": (0x20E, _U16),
    "type_of_loader": (0x210, _U8),
    "loadflags": (0x211, _U8),
    "code32_start": (0x214, _U32),
    "ramdisk_image": (0x218, _U32),
    "ramdisk_size": (0x21C, _U32),
    "heap_end_ptr": (0x224, _U16),
    "cmd_line_ptr": (0x228, _U32),
    "initrd_addr_max": (0x22C, _U32),
    "kernel_alignment": (0x230, _U32),
    "relocatable_kernel": (0x234, _U8),
    "min_alignment": (0x235, _U8),
    "xloadflags": (0x236, _U16),
    "cmdline_size": (0x238, _U32),
    "payload_offset": (0x248, _U32),
    "payload_length": (0x24C, _U32),
    "setup_data": (0x250, _U64),
    "pref_address": (0x258, _U64),
    "init_size": (0x260, _U32),
}
FIELD_OFFSETS = {name: off for name, (off, _) in _FIELDS.items()}
# The last field this module reads ends here; any header of protocol >= 2.12 is longer.
_MIN_HEADER_END = 0x264


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the setup header a loader needs, decoded from a bzImage."""

    setup_sects: int
    syssize: int
    boot_flag: int
    header: bytes
    version: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    raw: bytes  # the header bytes 0x1f1 .. end, to copy into the zero page

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF}"

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code (boot sector included) before the protected-mode part."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    @property
    def header_end(self) -> int:
        return SETUP_HEADER_OFFSET + len(self.raw)


def is_bzimage(data: bytes) -> bool:
    """True when `data` carries the "HdrS" setup-header magic."""
    return data[HDRS_OFFSET : HDRS_OFFSET + 4] == HDRS_MAGIC


def _field(data: bytes, name: str) -> int:
    off, fmt = _FIELDS[name]
    return int(struct.unpack_from("<" + fmt, data, off)[0])


def parse_setup_header(data: bytes) -> SetupHeader:
    """Decode and validate the setup header of the bzImage held in `data`.

    Only the 64-bit boot protocol is supported, which needs protocol 2.12 or newer
    and a kernel that sets XLF_KERNEL_64.
    """
    if len(data) < _MIN_HEADER_END or not is_bzimage(data):
        raise BootError('kernel image has no bzImage setup header ("HdrS" at 0x202)')
    version = _field(data, "version")
    xloadflags = _field(data, "xloadflags") if version >= MIN_PROTOCOL else 0
    if version < MIN_PROTOCOL or not xloadflags & XLF_KERNEL_64:
        raise BootError(
            f"bzImage boot protocol {version >> 8}.{version & 0xFF} too old (need 2.12 with a 64-bit entry)"
        )
    boot_flag = _field(data, "boot_flag")
    if boot_flag != BOOT_FLAG_MAGIC:
        raise BootError(f"bzImage boot_flag is {boot_flag:#06x}, expected {BOOT_FLAG_MAGIC:#06x}")
    setup_sects = _field(data, "setup_sects") or DEFAULT_SETUP_SECTS
    header_end = HDRS_OFFSET + data[SETUP_HEADER_JUMP_OFFSET]
    if header_end < _MIN_HEADER_END:
        raise BootError(f"bzImage setup header ends at {header_end:#x}, before its last field")
    if header_end > len(data) or (setup_sects + 1) * SECTOR_SIZE > len(data):
        raise BootError(f"bzImage is truncated: {len(data)} bytes, its setup part alone is longer")
    return SetupHeader(
        setup_sects=setup_sects,
        syssize=_field(data, "syssize"),
        boot_flag=boot_flag,
        header=HDRS_MAGIC,
        version=version,
        loadflags=_field(data, "loadflags"),
        code32_start=_field(data, "code32_start"),
        initrd_addr_max=_field(data, "initrd_addr_max"),
        kernel_alignment=_field(data, "kernel_alignment"),
        relocatable_kernel=bool(_field(data, "relocatable_kernel")),
        xloadflags=xloadflags,
        cmdline_size=_field(data, "cmdline_size"),
        payload_offset=_field(data, "payload_offset"),
        payload_length=_field(data, "payload_length"),
        pref_address=_field(data, "pref_address"),
        init_size=_field(data, "init_size"),
        raw=bytes(data[SETUP_HEADER_OFFSET:header_end]),
    )


def protected_mode_part(data: bytes, header: SetupHeader) -> memoryview:
    """The protected-mode kernel: everything after the real-mode setup sectors."""
    return memoryview(data)[header.setup_size :]


def decompression_range(header: SetupHeader, load_addr: int = HIMEM_START) -> tuple[int, int]:
    """[start, end) of the buffer the kernel decompresses itself into.

    The 64-bit stub (compressed/head_64.S) aligns its load address up to
    kernel_alignment when relocatable, moves up to pref_address (LOAD_PHYSICAL_ADDR)
    when below it, and needs init_size bytes from there.
    """
    alignment = header.kernel_alignment or 1
    aligned = -(-load_addr // alignment) * alignment if header.relocatable_kernel else 0
    start = max(aligned, header.pref_address)
    return start, start + header.init_size


def load_bzimage(mem: GuestMemory, data: bytes) -> LoadedKernel:
    """Write the protected-mode part of the bzImage `data` at HIMEM_START (1 MiB).

    The real-mode setup code is not loaded: the 64-bit entry at 1 MiB + 0x200 skips
    it, and its header reaches the kernel through the zero page instead.
    """
    header = parse_setup_header(data)
    pm = protected_mode_part(data, header)
    if len(pm) <= ENTRY_64_OFFSET:
        raise BootError(f"bzImage protected-mode part is only {len(pm)} bytes, no 64-bit entry in it")
    check_kernel_range(mem, "bzImage protected-mode part", HIMEM_START, HIMEM_START + len(pm))
    buf_start, buf_end = decompression_range(header)
    if not mem.contains(buf_start, buf_end - buf_start):
        raise BootError(
            f"bzImage needs {mib(header.init_size)} MiB (init_size) at {buf_start:#x} to decompress, "
            f"past the end of guest memory ({mib(mem.size)} MiB)"
        )
    mem.write(HIMEM_START, pm)
    return LoadedKernel(
        entry=HIMEM_START + ENTRY_64_OFFSET,
        start=HIMEM_START,
        end=max(HIMEM_START + len(pm), buf_end),
        setup_header=header.raw,
        initrd_addr_max=header.initrd_addr_max,
        cmdline_size=header.cmdline_size,
    )

"""Small kernel images built byte by byte, for tests that must not need a real kernel."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
PT_NOTE = 4
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")


@dataclass
class Segment:
    paddr: int
    data: bytes
    memsz: int | None = None  # defaults to len(data)
    p_type: int = PT_LOAD
    vaddr: int | None = None  # defaults to a high kernel-like address


def make_elf(
    segments: list[Segment],
    entry: int,
    *,
    elf_class: int = 2,
    machine: int = EM_X86_64,
    e_type: int = ET_EXEC,
) -> bytes:
    """An ELF64 file with one program header per segment, data after the headers."""
    phoff = ELF_HEADER.size
    offset = phoff + PROGRAM_HEADER.size * len(segments)
    headers, blobs = [], []
    for seg in segments:
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        vaddr = 0xFFFFFFFF80000000 + seg.paddr if seg.vaddr is None else seg.vaddr
        headers.append(PROGRAM_HEADER.pack(seg.p_type, 5, offset, vaddr, seg.paddr, len(seg.data), memsz, 0x1000))
        blobs.append(seg.data)
        offset += len(seg.data)
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    header = ELF_HEADER.pack(ident, e_type, machine, 1, entry, phoff, 0, 0, 64, 56, len(segments), 64, 0, 0)
    return header + b"".join(headers) + b"".join(blobs)


@dataclass
class BzImageSpec:
    """The setup-header fields a test may want to vary; defaults look like a modern kernel."""

    setup_sects: int = 4
    version: int = 0x020F
    xloadflags: int = 0x3  # XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    loadflags: int = 0x1  # LOADED_HIGH
    boot_flag: int = 0xAA55
    initrd_addr_max: int = 0x7FFFFFFF
    kernel_alignment: int = 0x200000
    relocatable: int = 1
    cmdline_size: int = 2047
    pref_address: int = 0x1000000
    init_size: int = 0x800000
    payload: bytes = b""
    pm_code: bytes = field(default_factory=lambda: bytes(range(256)) * 4)
    header_end: int = 0x26C  # 0x202 + the jump byte at 0x201


def make_bzimage(spec: BzImageSpec | None = None) -> bytes:
    """A bzImage: setup sectors with a setup header, then pm_code followed by the payload."""
    spec = spec or BzImageSpec()
    sects = spec.setup_sects or 4
    setup = bytearray((sects + 1) * 512)
    setup[0x1F1] = spec.setup_sects
    struct.pack_into("<H", setup, 0x1FE, spec.boot_flag)
    setup[0x200] = 0xEB  # short jmp over the header
    setup[0x201] = spec.header_end - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, spec.version)
    setup[0x211] = spec.loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, spec.initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, spec.kernel_alignment)
    setup[0x234] = spec.relocatable
    struct.pack_into("<H", setup, 0x236, spec.xloadflags)
    struct.pack_into("<I", setup, 0x238, spec.cmdline_size)
    struct.pack_into("<II", setup, 0x248, len(spec.pm_code), len(spec.payload))
    struct.pack_into("<Q", setup, 0x258, spec.pref_address)
    struct.pack_into("<I", setup, 0x260, spec.init_size)
    pm = spec.pm_code + spec.payload
    struct.pack_into("<I", setup, 0x1F4, (len(pm) + 15) // 16)  # syssize, 16-byte units
    return bytes(setup) + pm

from __future__ import annotations

from pathlib import Path

import pytest

from shared.boot.errors import BootError
from shared.boot.loader import load_boot
from shared.layout import CMDLINE_START, ZERO_PAGE_START, MiB, e820_map

from .images import BzImageSpec, Segment, make_bzimage, make_elf

CMDLINE = "console=ttyS0 reboot=k panic=1"


@pytest.fixture
def elf_kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_elf([Segment(0x1000000, b"\x90" * 0x2000, memsz=0x10000)], entry=0x1000000))
    return path


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_elf_boot_puts_everything_in_place(make_mem, elf_kernel: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(64 * MiB)
    initrd = write(tmp_path, "initrd", b"initrd!" * 1000)
    info = load_boot(mem, elf_kernel, CMDLINE, initrd, 64 * MiB, acpi_rsdp=0xE0000)
    assert info.kind == "elf"
    assert info.entry == 0x1000000 and mem.read(0x1000000, 4) == b"\x90" * 4
    assert info.kernel == (0x1000000, 0x1010000)
    assert info.zero_page == ZERO_PAGE_START
    assert info.cmdline == (CMDLINE_START, len(CMDLINE) + 1)
    assert mem.read(CMDLINE_START, len(CMDLINE) + 1) == CMDLINE.encode() + b"\0"
    addr, size = info.initrd  # type: ignore[misc]
    assert mem.read(addr, size) == b"initrd!" * 1000 and addr + size <= 64 * MiB

    zp = ZERO_PAGE_START
    assert mem.read(zp + 0x202, 4) == b"HdrS" and mem.read_u16(zp + 0x1FE) == 0xAA55
    assert mem.read_u8(zp + 0x210) == 0xFF
    assert mem.read_u32(zp + 0x228) == CMDLINE_START
    assert (mem.read_u32(zp + 0x218), mem.read_u32(zp + 0x21C)) == (addr, size)
    assert mem.read_u64(zp + 0x70) == 0xE0000
    assert mem.read_u8(zp + 0x1E8) == len(e820_map(64 * MiB))
    assert mem.read_u64(0x9000) & ~0xFFF == 0xA000  # page tables written
    assert mem.read_u64(0x510) == 0x00AF9B000000FFFF  # GDT __BOOT_CS

    regs = info.cpu_state.regs
    assert (regs["rip"], regs["rsi"]) == (0x1000000, ZERO_PAGE_START)
    assert info.to_dict()["initrd"] == [addr, size]


def test_bzimage_boot(make_mem, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(64 * MiB)
    spec = BzImageSpec(setup_sects=2, initrd_addr_max=48 * MiB - 1, payload=b"Z" * 3000)
    image = make_bzimage(spec)
    info = load_boot(mem, write(tmp_path, "bzImage", image), CMDLINE, write(tmp_path, "rd", b"R" * 8192), 64 * MiB)
    assert info.kind == "bzimage"
    assert info.entry == 0x100200 and info.cpu_state.regs["rip"] == 0x100200
    assert mem.read(0x100000, len(image) - 3 * 512) == image[3 * 512 :]
    assert info.kernel == (0x100000, 0x1000000 + spec.init_size)
    assert info.initrd == (48 * MiB - 8192, 8192)  # capped by initrd_addr_max
    zp = ZERO_PAGE_START
    assert mem.read(zp + 0x1F1, 0x210 - 0x1F1) == image[0x1F1:0x210]  # header copied
    assert mem.read(zp + 0x230, 0x26C - 0x230) == image[0x230:0x26C]
    assert mem.read_u8(zp + 0x210) == 0xFF
    assert mem.read_u64(zp + 0x70) == 0  # no RSDP given


def test_bzimage_cmdline_limit_is_the_kernels(make_mem, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kernel = write(tmp_path, "bzImage", make_bzimage(BzImageSpec(cmdline_size=20)))
    load_boot(make_mem(64 * MiB), kernel, "x" * 20, None, 64 * MiB)
    with pytest.raises(BootError, match="21 bytes, longer than the maximum 20"):
        load_boot(make_mem(64 * MiB), kernel, "x" * 21, None, 64 * MiB)


def test_neither_elf_nor_bzimage(make_mem, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BootError, match=r"^kernel image is neither an ELF vmlinux nor a bzImage$"):
        load_boot(make_mem(16 * MiB), write(tmp_path, "k", b"MZ" + bytes(5000)), CMDLINE, None, 16 * MiB)


def test_bzimage_larger_than_memory(make_mem, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    big = make_bzimage(BzImageSpec(payload=bytes(5 * MiB)))
    with pytest.raises(BootError, match=r"is 5\.\d MiB, larger than guest memory \(4 MiB\)"):
        load_boot(make_mem(4 * MiB), write(tmp_path, "bz", big), CMDLINE, None, 4 * MiB)


def test_elf_larger_than_memory(make_mem, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    elf = make_elf([Segment(0x100000, b"x", memsz=8 * MiB)], entry=0x100000)
    with pytest.raises(BootError, match=r"does not fit in guest memory \(4 MiB\)"):
        load_boot(make_mem(4 * MiB), write(tmp_path, "k", elf), CMDLINE, None, 4 * MiB)


def test_initrd_too_big(make_mem, elf_kernel: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BootError, match="initrd of 60 MiB does not fit in guest memory of 64 MiB"):
        load_boot(make_mem(64 * MiB), elf_kernel, CMDLINE, write(tmp_path, "rd", bytes(60 * MiB)), 64 * MiB)


def test_unreadable_files_and_size_mismatch(make_mem, elf_kernel: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(32 * MiB)
    with pytest.raises(BootError, match="cannot read kernel image"):
        load_boot(mem, tmp_path / "missing", CMDLINE, None, 32 * MiB)
    with pytest.raises(BootError, match="cannot read initrd"):
        load_boot(mem, elf_kernel, CMDLINE, tmp_path / "missing", 32 * MiB)
    with pytest.raises(BootError, match="configured with"):
        load_boot(mem, elf_kernel, CMDLINE, None, 64 * MiB)

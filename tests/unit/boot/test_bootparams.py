"""Zero-page layout, checked against the numbers in zero-page.rst and boot.rst."""

from __future__ import annotations

import struct

import pytest

from shared.boot import bootparams as bp
from shared.boot.bzimage import FIELD_OFFSETS
from shared.boot.errors import BootError
from shared.layout import CMDLINE_START, GiB, MiB, e820_map

from .images import make_bzimage


def test_offsets_match_the_spec() -> None:
    assert (bp.ACPI_RSDP_ADDR, bp.EXT_RAMDISK_IMAGE, bp.EXT_RAMDISK_SIZE, bp.EXT_CMD_LINE_PTR) == (
        0x070,
        0x0C0,
        0x0C4,
        0x0C8,
    )
    assert (bp.E820_ENTRIES, bp.SENTINEL, bp.E820_TABLE, bp.E820_ENTRY.size, bp.E820_MAX_ENTRIES) == (
        0x1E8,
        0x1EF,
        0x2D0,
        20,
        128,
    )
    spec = {
        "setup_sects": 0x1F1,
        "syssize": 0x1F4,
        "boot_flag": 0x1FE,
        "header": 0x202,
        "version": 0x206,
        "type_of_loader": 0x210,
        "loadflags": 0x211,
        "code32_start": 0x214,
        "ramdisk_image": 0x218,
        "ramdisk_size": 0x21C,
        "cmd_line_ptr": 0x228,
        "initrd_addr_max": 0x22C,
        "kernel_alignment": 0x230,
        "relocatable_kernel": 0x234,
        "xloadflags": 0x236,
        "cmdline_size": 0x238,
        "payload_offset": 0x248,
        "payload_length": 0x24C,
        "setup_data": 0x250,
        "pref_address": 0x258,
        "init_size": 0x260,
    }
    assert {name: FIELD_OFFSETS[name] for name in spec} == spec


def u32(page: bytes, off: int) -> int:
    return int.from_bytes(page[off : off + 4], "little")


def test_elf_kernel_gets_a_synthesized_header() -> None:
    page = bp.build_zero_page(None, CMDLINE_START, e820_map(64 * MiB), cmdline_max=2047)
    assert len(page) == 4096
    assert page[0x1FE:0x200] == b"\x55\xaa"
    assert page[0x202:0x206] == b"HdrS"
    assert u32(page, 0x230) == 0x1000000
    assert page[0x210] == 0xFF
    assert page[0x211] & 0x1  # LOADED_HIGH
    assert u32(page, 0x238) == 2047
    assert u32(page, 0x228) == CMDLINE_START and u32(page, 0x0C8) == 0


def test_bzimage_header_is_copied_then_loader_fields_set() -> None:
    image = make_bzimage()
    header = image[0x1F1:0x26C]
    page = bp.build_zero_page(header, CMDLINE_START, e820_map(64 * MiB), initrd=(0x3000000, 0x12345))
    untouched = set(range(0x1F1, 0x26C)) - set(range(0x210, 0x211)) - set(range(0x218, 0x220))
    untouched -= set(range(0x228, 0x22C))
    assert all(page[i] == image[i] for i in untouched)
    assert page[0x210] == 0xFF
    assert u32(page, 0x218) == 0x3000000 and u32(page, 0x21C) == 0x12345
    assert u32(page, 0x0C0) == 0 and u32(page, 0x0C4) == 0
    assert page[0x26C:0x290] == bytes(0x290 - 0x26C)


def test_addresses_above_4g_are_split_into_ext_fields() -> None:
    page = bp.build_zero_page(None, 0x1_2345_6000, [], initrd=(0x2_0000_1000, 0x3_0000_0002))
    assert u32(page, 0x228) == 0x2345_6000 and u32(page, 0x0C8) == 1
    assert u32(page, 0x218) == 0x1000 and u32(page, 0x0C0) == 2
    assert u32(page, 0x21C) == 2 and u32(page, 0x0C4) == 3


def test_acpi_rsdp_is_a_u64_at_0x70_and_absent_by_default() -> None:
    assert bp.build_zero_page(None, CMDLINE_START, [])[0x70:0x78] == bytes(8)
    page = bp.build_zero_page(None, CMDLINE_START, [], acpi_rsdp=0xE0000)
    assert struct.unpack_from("<Q", page, 0x70)[0] == 0xE0000


@pytest.mark.parametrize("mem_size", [64 * MiB, 4 * GiB])
def test_e820_table_is_written_entry_by_entry(mem_size: int) -> None:
    entries = e820_map(mem_size)
    page = bp.build_zero_page(None, CMDLINE_START, entries)
    assert page[0x1E8] == len(entries)
    table = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(len(entries))]
    assert table == entries
    assert page[0x2D0 + 20 * len(entries) : 0x2D0 + 20 * (len(entries) + 1)] == bytes(20)


def test_e820_for_64_mib_is_low_ram_then_himem() -> None:
    page = bp.build_zero_page(None, CMDLINE_START, e820_map(64 * MiB))
    assert struct.unpack_from("<QQI", page, 0x2D0) == (0, 0x9FC00, 1)
    assert struct.unpack_from("<QQI", page, 0x2D0 + 20) == (0x100000, 63 * MiB, 1)


def test_too_many_e820_entries_is_an_error() -> None:
    with pytest.raises(BootError, match="129 entries"):
        bp.build_zero_page(None, CMDLINE_START, [(i * 0x1000, 0x1000, 1) for i in range(129)])


def test_write_zero_page_puts_it_at_0x7000(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(4 * MiB)
    page = bp.build_zero_page(None, CMDLINE_START, e820_map(4 * MiB))
    bp.write_zero_page(mem, page)
    assert mem.read(0x7000, 4096) == page
    assert mem.read_u32(0x7000 + 0x228) == CMDLINE_START

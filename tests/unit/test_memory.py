from __future__ import annotations

import os

import pytest

from shared import layout
from shared.memory import GuestMemory, GuestMemoryError, create_guest_memfd

MiB = layout.MiB


@pytest.fixture
def mem():
    fd = create_guest_memfd(4 * MiB)
    m = GuestMemory.map(fd, 4 * MiB)
    yield m
    m.close()
    os.close(fd)


def test_write_then_read_round_trips(mem: GuestMemory):
    mem.write(0x1000, b"abc")

    assert mem.read(0x1000, 3) == b"abc"


def test_integers_are_little_endian(mem: GuestMemory):
    mem.write_u32(0x2000, 0x11223344)

    assert mem.read(0x2000, 4) == bytes([0x44, 0x33, 0x22, 0x11])


@pytest.mark.parametrize(("addr", "length"), [(4 * MiB, 1), (4 * MiB - 2, 4), (-1, 1), (0, 4 * MiB + 1)])
def test_access_outside_guest_ram_is_an_error(mem: GuestMemory, addr: int, length: int):
    with pytest.raises(GuestMemoryError):
        mem.read(addr, length)


def test_memfd_cannot_be_resized():
    fd = create_guest_memfd(2 * MiB)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, MiB)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4 * MiB)
    finally:
        os.close(fd)


def test_small_memory_is_one_region_from_zero():
    assert layout.ram_regions(128 * MiB) == [layout.MemoryRegion(0, 128 * MiB, 0)]


def test_memory_past_the_mmio_gap_continues_above_4g():
    regions = layout.ram_regions(4 * layout.GiB)

    assert regions == [
        layout.MemoryRegion(0, layout.MMIO_GAP_START, 0),
        layout.MemoryRegion(
            layout.FIRST_ADDR_PAST_32BITS, 4 * layout.GiB - layout.MMIO_GAP_START, layout.MMIO_GAP_START
        ),
    ]


def test_e820_skips_the_legacy_hole_and_the_mmio_gap():
    assert layout.e820_map(4 * layout.GiB) == [
        (0, layout.EBDA_START, layout.E820_RAM),
        (layout.HIMEM_START, layout.MMIO_GAP_START - layout.HIMEM_START, layout.E820_RAM),
        (layout.FIRST_ADDR_PAST_32BITS, 4 * layout.GiB - layout.MMIO_GAP_START, layout.E820_RAM),
    ]


def test_high_memory_is_addressed_at_its_guest_address():
    size = layout.MMIO_GAP_START + 2 * MiB
    fd = create_guest_memfd(size)
    mem = GuestMemory.map(fd, size)
    try:
        mem.write(layout.FIRST_ADDR_PAST_32BITS, b"hi")

        assert mem.offset_of(layout.FIRST_ADDR_PAST_32BITS, 2) == layout.MMIO_GAP_START
        with pytest.raises(GuestMemoryError):
            mem.read(layout.MMIO_GAP_START, 1)
    finally:
        mem.close()
        os.close(fd)

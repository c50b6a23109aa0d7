"""PFN validation with hostile inputs: only whole RAM pages of the e820 map become memfd ranges."""

from __future__ import annotations

import pytest

from devices.balloon.pages import PAGE_SIZE, RamMap, merge
from shared.layout import EBDA_START, HIMEM_START, MMIO_GAP_START, GiB, MiB

LOW = RamMap(64 * MiB)
HIGH = RamMap(MMIO_GAP_START + GiB)  # RAM on both sides of the MMIO gap (no memory is allocated)


def test_pages_in_ram_map_to_their_offsets() -> None:
    assert LOW.pfn_offset(0x100) == HIMEM_START
    assert LOW.pfn_offset((64 * MiB >> 12) - 1) == 64 * MiB - PAGE_SIZE
    assert LOW.pfn_offset(0) == 0


@pytest.mark.parametrize(
    "pfn",
    [
        (64 * MiB) >> 12,  # one past the end of RAM
        0xFFFFFFFF,  # the largest PFN a guest can write
        EBDA_START >> 12,  # the page holding the EBDA: only partly RAM
        0xA0,  # legacy hole (VGA)
        0xE0,  # ACPI tables area: reserved, not RAM
        0xFF,
    ],
)
def test_hostile_pfns_are_refused(pfn: int) -> None:
    assert LOW.pfn_offset(pfn) is None
    ranges, refused = LOW.page_ranges([pfn])
    assert (ranges, refused) == ([], 1)


def test_mmio_gap_is_refused_and_ram_above_4g_maps_after_low_ram() -> None:
    gap_pfns = [MMIO_GAP_START >> 12, (MMIO_GAP_START >> 12) + 1, (1 << 32 >> 12) - 1]
    assert all(HIGH.pfn_offset(pfn) is None for pfn in gap_pfns)
    assert HIGH.pfn_offset(1 << 32 >> 12) == MMIO_GAP_START  # first page above 4 GiB
    assert HIGH.pfn_offset(((1 << 32) + GiB >> 12) - 1) == MMIO_GAP_START + GiB - PAGE_SIZE
    assert HIGH.pfn_offset((1 << 32) + GiB >> 12) is None  # past the end


def test_page_ranges_merge_runs_and_count_refusals() -> None:
    pfns = [0x200, 0x201, 0x203, 0x202, 0x201, 0xFFFFFF, 0x300]
    ranges, refused = LOW.page_ranges(pfns)
    assert refused == 1
    assert ranges == [(0x200000, 4 * PAGE_SIZE), (0x300000, PAGE_SIZE)]


def test_merge_of_nothing_is_nothing() -> None:
    assert merge([], PAGE_SIZE) == []


def test_file_offset_refuses_ranges_straddling_the_end_or_empty() -> None:
    assert LOW.file_offset(64 * MiB - PAGE_SIZE, 2 * PAGE_SIZE) is None
    assert LOW.file_offset(HIMEM_START, 0) is None
    assert LOW.file_offset(-PAGE_SIZE, PAGE_SIZE) is None

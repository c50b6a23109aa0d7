"""Which guest page frames the balloon may give back, and where they are in the memfd.

The guest names pages by PFN (4 KiB frames, virtio spec 5.5.6), and the guest is hostile:
a PFN is accepted only when its whole page is RAM in the e820 map the guest was booted with
(`shared.layout.e820_map`): not the legacy hole below 1 MiB, not the 32-bit MMIO gap, not
past the end of memory. What is accepted becomes memfd byte ranges (RAM above 4 GiB sits
right after the low RAM in the file), sorted and merged, so a run of pages costs one
fallocate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.layout import E820_RAM, e820_map, ram_regions

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MIB_PAGES = (1 << 20) >> PAGE_SHIFT  # 256 pages per MiB


@dataclass(frozen=True)
class RamRange:
    """Guest [start, end) that is e820 RAM, at `file_offset` in the guest-memory memfd."""

    start: int
    end: int
    file_offset: int


class RamMap:
    """The guest's RAM as the balloon may touch it."""

    def __init__(self, mem_size: int) -> None:
        regions = ram_regions(mem_size)
        ranges = []
        for addr, size, kind in e820_map(mem_size):
            if kind != E820_RAM:
                continue
            region = next(r for r in regions if r.guest_addr <= addr and addr + size <= r.end)
            ranges.append(RamRange(addr, addr + size, region.file_offset + addr - region.guest_addr))
        self.ranges = tuple(ranges)
        self.mem_size = mem_size

    def file_offset(self, addr: int, length: int) -> int | None:
        """The memfd offset of guest [addr, addr+length) if it is all RAM, else None."""
        if addr < 0 or length <= 0:
            return None
        for r in self.ranges:
            if r.start <= addr and addr + length <= r.end:
                return r.file_offset + addr - r.start
        return None

    def pfn_offset(self, pfn: int) -> int | None:
        """The memfd offset of page frame `pfn`, or None when it is not a RAM page."""
        return self.file_offset(pfn << PAGE_SHIFT, PAGE_SIZE)

    def page_ranges(self, pfns: Iterable[int]) -> tuple[list[tuple[int, int]], int]:
        """(merged memfd (offset, length) ranges of the RAM pages among `pfns`, number refused)."""
        offsets = []
        refused = 0
        for pfn in pfns:
            offset = self.pfn_offset(pfn)
            if offset is None:
                refused += 1
            else:
                offsets.append(offset)
        return merge(offsets, PAGE_SIZE), refused


def merge(offsets: Iterable[int], unit: int) -> list[tuple[int, int]]:
    """Sorted, de-duplicated `unit`-sized blocks at `offsets` as (offset, length) runs."""
    runs: list[tuple[int, int]] = []
    for offset in sorted(set(offsets)):
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + unit)
        else:
            runs.append((offset, unit))
    return runs

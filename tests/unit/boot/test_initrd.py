from __future__ import annotations

import pytest

from shared.boot.errors import BootError
from shared.boot.initrd import load_initrd, place_initrd
from shared.layout import GiB, MiB


def test_initrd_goes_page_aligned_at_the_top_of_low_ram(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(64 * MiB)
    addr = place_initrd(mem, 5000, kernel_end=0x2000000, initrd_addr_max=0x7FFFFFFF)
    assert addr == 64 * MiB - 0x2000  # 5000 bytes round the start down to a page
    assert addr + 5000 <= 64 * MiB


def test_initrd_addr_max_caps_the_end(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(64 * MiB)
    assert place_initrd(mem, 0x1000, 0x200000, initrd_addr_max=32 * MiB - 1) == 32 * MiB - 0x1000


def test_initrd_stays_below_the_mmio_gap(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(4 * GiB)  # low region ends at 0xd0000000, the rest is above 4 GiB
    assert place_initrd(mem, MiB, 0x2000000, initrd_addr_max=0xFFFFFFFF) == 0xD0000000 - MiB


def test_initrd_that_does_not_fit_above_the_kernel_is_an_error(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(64 * MiB)
    with pytest.raises(BootError, match=r"^initrd of 40 MiB does not fit in guest memory of 64 MiB"):
        place_initrd(mem, 40 * MiB, kernel_end=30 * MiB, initrd_addr_max=0x7FFFFFFF)
    assert place_initrd(mem, 34 * MiB, kernel_end=30 * MiB, initrd_addr_max=0x7FFFFFFF) == 30 * MiB


def test_load_initrd_writes_the_bytes(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(16 * MiB)
    data = b"070701" + bytes(range(200))
    addr, size = load_initrd(mem, data, kernel_end=0x400000, initrd_addr_max=0x37FFFFFF)
    assert size == len(data) and mem.read(addr, size) == data
    assert addr % 4096 == 0 and addr >= 0x400000


def test_empty_initrd_is_rejected(make_mem) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BootError, match="empty"):
        place_initrd(make_mem(16 * MiB), 0, 0x400000, 0x37FFFFFF)

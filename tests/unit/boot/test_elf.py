from __future__ import annotations

import io

import pytest

from shared.boot.elf import load_elf
from shared.boot.errors import BootError
from shared.layout import MiB

from .images import PT_NOTE, Segment, make_elf


def test_segments_land_at_paddr_and_bss_is_zeroed(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(32 * MiB)
    mem.fill(0x200000, 0x3000, 0xEE)  # stale bytes where the bss goes
    text = bytes(range(256)) * 8
    image = make_elf(
        [Segment(0x200000, text, memsz=0x3000), Segment(0x400000, b"data" * 4), Segment(0x10, b"note", p_type=PT_NOTE)],
        entry=0x200010,
    )
    kernel = load_elf(mem, io.BytesIO(image))
    assert kernel.entry == 0x200010
    assert (kernel.start, kernel.end) == (0x200000, 0x400010)
    assert kernel.setup_header is None
    assert mem.read(0x200000, len(text)) == text
    assert mem.read(0x200000 + len(text), 0x3000 - len(text)) == bytes(0x3000 - len(text))
    assert mem.read(0x400000, 16) == b"data" * 4


def test_segment_outside_memory_is_a_boot_error(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(16 * MiB)
    image = make_elf([Segment(0x200000, b"x"), Segment(15 * MiB, b"y", memsz=2 * MiB)], entry=0x200000)
    with pytest.raises(BootError, match=r"kernel segment 1 .* does not fit in guest memory \(16 MiB\)"):
        load_elf(mem, io.BytesIO(image))
    assert mem.read(0x200000, 1) == b"\0"  # validated before anything was written


def test_segment_below_1mib_is_rejected(make_mem) -> None:  # type: ignore[no-untyped-def]
    image = make_elf([Segment(0x7000, b"x" * 16)], entry=0x7000)
    with pytest.raises(BootError, match="overlaps the boot structures below 0x100000"):
        load_elf(make_mem(16 * MiB), io.BytesIO(image))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"elf_class": 1}, "32-bit"),
        ({"machine": 183}, "EM_AARCH64"),
        ({"e_type": 3}, "ET_DYN"),
    ],
)
def test_wrong_kind_of_elf_is_rejected(make_mem, kwargs: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    image = make_elf([Segment(0x200000, b"x")], entry=0x200000, **kwargs)
    with pytest.raises(BootError, match=message):
        load_elf(make_mem(16 * MiB), io.BytesIO(image))


def test_entry_outside_segments_is_rejected(make_mem) -> None:  # type: ignore[no-untyped-def]
    image = make_elf([Segment(0x200000, b"x" * 16)], entry=0x300000)
    with pytest.raises(BootError, match="entry 0x300000 is outside"):
        load_elf(make_mem(16 * MiB), io.BytesIO(image))


def test_no_load_segment_is_rejected(make_mem) -> None:  # type: ignore[no-untyped-def]
    image = make_elf([Segment(0x200000, b"x", p_type=PT_NOTE)], entry=0x200000)
    with pytest.raises(BootError, match="no PT_LOAD"):
        load_elf(make_mem(16 * MiB), io.BytesIO(image))


def test_garbage_is_not_an_elf(make_mem) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BootError, match="not a valid ELF"):
        load_elf(make_mem(16 * MiB), io.BytesIO(b"\x7fELF" + b"\xff" * 10))


def test_truncated_segment_data_is_rejected(make_mem) -> None:  # type: ignore[no-untyped-def]
    image = make_elf([Segment(0x200000, b"x" * 4096)], entry=0x200000)
    with pytest.raises(BootError, match="truncated"):
        load_elf(make_mem(16 * MiB), io.BytesIO(image[:-100]))

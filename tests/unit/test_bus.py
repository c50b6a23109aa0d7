from __future__ import annotations

import pytest

from vcpu_worker.bus import Bus, RangeMap


class Reg:
    def __init__(self) -> None:
        self.written: list[tuple[int, int]] = []

    def read(self, offset: int) -> int:
        return 0x40 + offset

    def write(self, offset: int, value: int) -> None:
        self.written.append((offset, value))


def test_range_map_finds_the_device_and_its_base():
    ranges: RangeMap[str] = RangeMap("test")
    ranges.add(0x60, 5, "i8042")
    ranges.add(0x3F8, 8, "uart")

    assert ranges.find(0x3FA) == (0x3F8, "uart")
    assert ranges.find(0x65) is None


def test_range_map_refuses_an_access_that_straddles_the_end():
    ranges: RangeMap[str] = RangeMap("test")
    ranges.add(0x1000, 0x10, "dev")

    assert ranges.find(0x100C, 8) is None


@pytest.mark.parametrize(("base", "size"), [(0x3FC, 8), (0x3F0, 9), (0x3F8, 1)])
def test_overlapping_ranges_are_refused(base: int, size: int):
    ranges: RangeMap[str] = RangeMap("port I/O")
    ranges.add(0x3F8, 8, "uart")

    with pytest.raises(ValueError, match="overlaps"):
        ranges.add(base, size, "other")


def test_port_bus_reads_bytewise_with_offsets():
    bus = Bus("port I/O")
    bus.add(0x3F8, 8, Reg())

    assert bus.read(0x3F9, 2) == bytes([0x41, 0x42])


def test_unclaimed_port_reads_all_ones_and_is_reported_once_a_second():
    reports: list[str] = []
    bus = Bus("port I/O", reports.append)

    assert bus.read(0x510, 1) == b"\xff"
    bus.write(0x511, b"\x01")

    assert (bus.unhandled.reads, bus.unhandled.writes) == (1, 1)
    assert reports == ["unhandled port I/O read at 0x510 (1 bytes)"]

"""Statistics parsing: the guest's stats buffer is hostile input."""

from __future__ import annotations

import struct

import pytest

from devices.balloon.stats import ENTRY, MAX_ENTRIES, STAT_NAMES, StatsError, parse_stats


def buffer(*entries: tuple[int, int]) -> bytes:
    return b"".join(ENTRY.pack(tag, value) for tag, value in entries)


def test_known_tags_get_firecrackers_names() -> None:
    stats, unknown = parse_stats(buffer(*((tag, tag * 1000 + 1) for tag in STAT_NAMES)))
    assert unknown == 0
    assert stats["swap_in"] == 1 and stats["free_memory"] == 4001 and stats["hugetlb_failures"] == 9001
    assert set(stats) == set(STAT_NAMES.values())


def test_entries_are_packed_10_bytes() -> None:
    assert ENTRY.size == 10
    assert parse_stats(struct.pack("<HQ", 5, 256 << 20)) == ({"total_memory": 256 << 20}, 0)


def test_unknown_tags_are_skipped_and_counted() -> None:
    stats, unknown = parse_stats(buffer((4, 7), (10, 1), (0xFFFF, 2)))
    assert stats == {"free_memory": 7} and unknown == 2


def test_last_value_of_a_repeated_tag_wins() -> None:
    assert parse_stats(buffer((4, 1), (4, 2)))[0] == {"free_memory": 2}


def test_u64_extremes_survive() -> None:
    assert parse_stats(buffer((6, 2**64 - 1)))[0] == {"available_memory": 2**64 - 1}


@pytest.mark.parametrize("data", [b"\x04", buffer((4, 1)) + b"\x00", b"\x00" * 9])
def test_torn_entries_fail(data: bytes) -> None:
    with pytest.raises(StatsError):
        parse_stats(data)


def test_too_many_entries_fail() -> None:
    with pytest.raises(StatsError):
        parse_stats(buffer(*([(4, 1)] * (MAX_ENTRIES + 1))))


def test_empty_buffer_is_no_statistics() -> None:
    assert parse_stats(b"") == ({}, 0)

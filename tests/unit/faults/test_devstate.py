"""The device state area: snapshots survive the writer, torn writes fall back, fatal codes."""

from __future__ import annotations

import os

import pytest

from shared.devstate import (
    AREA_BYTES,
    FATAL_CRASH,
    SLOT_BYTES,
    SLOTS_OFFSET,
    StateArea,
    StateAreaError,
    create_state_memfd,
    read_area,
    read_state,
    take_fatal,
)


@pytest.fixture
def fd():
    fd = create_state_memfd("test")
    yield fd
    os.close(fd)


def test_a_fresh_area_holds_no_state(fd):
    assert read_state(read_area(fd)) is None
    assert StateArea(fd).read() is None


def test_the_latest_snapshot_is_read_by_a_new_mapping(fd):
    writer = StateArea(fd)
    writer.write({"transport": {"status": 1}})
    writer.write({"transport": {"status": 15}})
    writer.close()

    assert StateArea(fd).read() == {"transport": {"status": 15}}
    assert read_state(read_area(fd)) == {"transport": {"status": 15}}


def test_a_torn_active_slot_falls_back_to_the_previous_snapshot(fd):
    area = StateArea(fd)
    area.write({"n": 1})
    area.write({"n": 2})
    active = int.from_bytes(os.pread(fd, 4, 8), "little")
    os.pwrite(fd, b"\xff\xff", SLOTS_OFFSET + active * SLOT_BYTES + 16)  # corrupt its payload

    assert read_state(read_area(fd)) == {"n": 1}


def test_a_new_writer_continues_the_generations(fd):
    StateArea(fd).write({"n": 1})
    second = StateArea(fd)
    second.write({"n": 2})

    assert read_state(read_area(fd)) == {"n": 2}


def test_oversized_state_is_refused(fd):
    with pytest.raises(StateAreaError):
        StateArea(fd).write({"blob": b"x" * SLOT_BYTES})


def test_fatal_code_is_taken_once(fd):
    StateArea(fd).set_fatal(FATAL_CRASH)

    assert take_fatal(fd) == FATAL_CRASH
    assert take_fatal(fd) == 0
    assert os.fstat(fd).st_size == AREA_BYTES

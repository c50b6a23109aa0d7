"""Memory files: Full copies what the memfd holds (sparse), Diff only the dirty pages,
base + diffs merge back to the memory, and a load fills a new sealed memfd."""

from __future__ import annotations

import os

import pytest

from shared import snapshot_memory as sm
from shared.dirty import DirtyLog, create_dirty_memfd, take_dirty
from shared.memory import GuestMemory, create_guest_memfd

SIZE = 4 << 20
PAGE = sm.PAGE


def memfd_with(pages: dict[int, bytes]) -> int:
    fd = create_guest_memfd(SIZE)
    for page, data in pages.items():
        os.pwrite(fd, data, page * PAGE)
    return fd


def test_full_dump_is_sparse_and_equal(tmp_path):
    fd = memfd_with({0: b"a" * PAGE, 700: b"b" * 10})
    with open(tmp_path / "mem", "w+b") as out:
        copied = sm.dump_full(fd, SIZE, out.fileno())
    data = (tmp_path / "mem").read_bytes()

    assert len(data) == SIZE
    assert data == os.pread(fd, SIZE, 0)
    assert copied < SIZE
    assert os.stat(tmp_path / "mem").st_blocks * 512 < SIZE


def test_dirty_runs():
    bitmap = (0b1110_0001 | (1 << 9)).to_bytes(2, "little")
    assert list(sm.dirty_runs(bitmap, 16)) == [(0, 1), (5, 3), (9, 1)]


def test_base_plus_diff_is_the_new_memory(tmp_path):
    fd = memfd_with({1: b"x" * PAGE, 2: b"y" * PAGE})
    with open(tmp_path / "base", "w+b") as out:
        sm.dump_full(fd, SIZE, out.fileno())
    os.pwrite(fd, b"z" * 100, 2 * PAGE)
    os.pwrite(fd, bytes(PAGE), 1 * PAGE)  # zeroed: must be carried by the diff too
    bitmap = ((1 << 1) | (1 << 2)).to_bytes(SIZE // PAGE // 8, "little")
    with open(tmp_path / "diff", "w+b") as out:
        sm.dump_diff(fd, SIZE, out.fileno(), bitmap)
    with open(tmp_path / "base", "r+b") as base, open(tmp_path / "diff", "rb") as diff:
        sm.apply_diff(base.fileno(), diff.fileno(), SIZE)

    assert (tmp_path / "base").read_bytes() == os.pread(fd, SIZE, 0)


def test_load_fills_a_sealed_memfd_and_checks_the_size(tmp_path):
    fd = memfd_with({3: b"q" * PAGE})
    with open(tmp_path / "mem", "w+b") as out:
        sm.dump_full(fd, SIZE, out.fileno())
    with open(tmp_path / "mem", "rb") as f:
        loaded = sm.load_memory(f.fileno(), SIZE, "test")
        with pytest.raises(ValueError, match="holds"):
            sm.load_memory(f.fileno(), SIZE * 2, "test")
    try:
        assert os.pread(loaded, SIZE, 0) == os.pread(fd, SIZE, 0)
        with pytest.raises(OSError):
            os.ftruncate(loaded, SIZE // 2)  # sealed like a booted microVM's memory
    finally:
        os.close(loaded)


def test_device_writes_through_guest_memory_are_logged_and_taken_once():
    memfd = create_guest_memfd(SIZE)
    log_fd = create_dirty_memfd("dev", SIZE)
    mem = GuestMemory.map(memfd, SIZE)
    mem.dirty = DirtyLog(log_fd)
    mem.write(5 * PAGE + 10, b"x" * (PAGE + 1))  # pages 5 and 6
    mem.write_u16(9 * PAGE, 7)

    assert take_dirty(log_fd) == (1 << 5) | (1 << 6) | (1 << 9)
    assert take_dirty(log_fd) == 0
    mem.dirty.close()
    mem.close()

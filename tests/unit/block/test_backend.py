"""Backends: zero-copy vectored I/O between a file and guest memory views."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devices.block.backend import BackendError, FileBackend, MemoryBackend, _drop_front
from shared.memory import GuestMemory
from tests.unit.block.conftest import SECTORS, sector_pattern


def test_file_backend_size(file_backend: FileBackend) -> None:
    assert file_backend.size == SECTORS * 512


def test_preadv_fills_guest_memory_views(file_backend: FileBackend, mem: GuestMemory) -> None:
    views = [mem.slice(0x1000, 512), mem.slice(0x3000, 512)]

    file_backend.preadv(views, 512)

    assert mem.read(0x3000, 512) == sector_pattern(2)


def test_pwritev_writes_from_guest_memory_views(file_backend: FileBackend, mem: GuestMemory, disk: Path) -> None:
    mem.write(0x1000, b"z" * 512)

    file_backend.pwritev([mem.slice(0x1000, 512)], 512 * 5)

    assert disk.read_bytes()[512 * 5 : 512 * 6] == b"z" * 512


def test_preadv_past_end_of_file_raises(file_backend: FileBackend, mem: GuestMemory) -> None:
    with pytest.raises(BackendError, match="end of the file"):
        file_backend.preadv([mem.slice(0x1000, 512)], SECTORS * 512)


def test_io_error_becomes_backend_error(disk: Path, mem: GuestMemory) -> None:
    backend = FileBackend(os.open(disk, os.O_RDONLY | os.O_CLOEXEC))

    with pytest.raises(BackendError, match="write"):
        backend.pwritev([mem.slice(0x1000, 512)], 0)
    backend.close()


def test_flush_succeeds_on_a_file(file_backend: FileBackend) -> None:
    file_backend.flush()


def test_drop_front_splits_a_buffer() -> None:
    views = [memoryview(bytearray(b"abc")), memoryview(bytearray(b"defg"))]

    rest = _drop_front(views, 4)

    assert [bytes(v) for v in rest] == [b"efg"]


def test_memory_backend_injected_failure() -> None:
    backend = MemoryBackend(bytes(512))
    backend.fail = True

    with pytest.raises(BackendError):
        backend.flush()

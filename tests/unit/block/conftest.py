"""Fixtures: guest memory, a mock driver, a disk file with a known pattern, a block device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.block.backend import FileBackend
from devices.block.request import HEADER, RequestType
from shared.memory import GuestMemory
from shared.virtio.queue import Queue
from shared.virtio.testing import MockDriver, make_guest_memory

SECTORS = 128  # 64 KiB disk


def sector_pattern(sector: int) -> bytes:
    """What the test disk holds in `sector`: its number, repeated."""
    return bytes([sector % 256]) * 512


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = make_guest_memory()
    yield memory
    memory.close()


@pytest.fixture
def driver(mem: GuestMemory) -> MockDriver:
    return MockDriver(mem, size=64)


@pytest.fixture
def queue(driver: MockDriver) -> Queue:
    return driver.queue()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(sector_pattern(i) for i in range(SECTORS)))
    return path


@pytest.fixture
def file_backend(disk: Path) -> Iterator[FileBackend]:
    backend = FileBackend(os.open(disk, os.O_RDWR | os.O_CLOEXEC))
    yield backend
    backend.close()


def header(kind: int, sector: int = 0) -> bytes:
    return HEADER.pack(kind, 0, sector)


def add_read(driver: MockDriver, sector: int, length: int, *, indirect: bool = False) -> int:
    return driver.add_chain([header(RequestType.IN, sector)], [length, 1], indirect=indirect)


def add_write(driver: MockDriver, sector: int, data: bytes) -> int:
    return driver.add_chain([header(RequestType.OUT, sector), data], [1])


def status_of(driver: MockDriver, head: int) -> int:
    return driver.written(head)[-1][-1]

"""Fixtures for the boot tests: guest memory backed by a real sealed memfd."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from shared.layout import MiB
from shared.memory import GuestMemory, create_guest_memfd

MakeMem = Callable[[int], GuestMemory]


@pytest.fixture
def make_mem() -> Iterator[MakeMem]:
    """Factory for GuestMemory of a given size; everything is unmapped at teardown."""
    made: list[tuple[int, GuestMemory]] = []

    def make(size: int = 64 * MiB) -> GuestMemory:
        fd = create_guest_memfd(size)
        mem = GuestMemory.map(fd, size)
        made.append((fd, mem))
        return mem

    yield make
    for fd, mem in made:
        mem.close()
        os.close(fd)

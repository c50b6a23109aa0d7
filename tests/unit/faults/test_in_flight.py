"""Which chains were in flight when a worker died: its pops, recorded in the state area,
against the used index in guest memory (shared.devstate.StateArea.in_flight)."""

from __future__ import annotations

import os

from shared.devstate import StateArea, create_state_memfd
from shared.virtio.testing import MockDriver, make_guest_memory


def test_popped_but_not_completed_chains_are_in_flight_for_the_replacement():
    fd = create_state_memfd("test")
    try:
        mem = make_guest_memory()
        driver = MockDriver(mem, 8)
        queue = driver.queue()
        area = StateArea(fd)
        queue.pop_hook = lambda value: area.set_popped(0, value)
        for n in range(4):
            driver.add_chain(readable=[bytes([n])])
        first = queue.pop()
        queue.pop()
        queue.pop()
        assert first is not None
        queue.add_used(first.head, 0)  # one completed, two popped and left: the worker "dies"

        replacement = StateArea(fd)
        resynced = driver.queue()
        resynced.resync_from_used_ring()

        assert replacement.popped(0) == 3
        assert replacement.in_flight(0, resynced.next_used, resynced.size) == 2
        assert replacement.in_flight(1, 0, 8) == 0  # a queue that never popped
    finally:
        os.close(fd)


def test_undo_pop_is_recorded_too():
    fd = create_state_memfd("test")
    try:
        mem = make_guest_memory()
        driver = MockDriver(mem, 8)
        queue = driver.queue()
        area = StateArea(fd)
        queue.pop_hook = lambda value: area.set_popped(0, value)
        driver.add_chain(readable=[b"x"])
        queue.pop()
        queue.undo_pop()  # e.g. the rate limiter said not yet: nothing is in flight

        assert area.in_flight(0, 0, 8) == 0
    finally:
        os.close(fd)

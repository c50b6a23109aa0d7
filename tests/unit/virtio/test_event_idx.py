"""VIRTIO_F_EVENT_IDX in both directions, around the u16 wrap of the ring indices.

used_event (driver -> device: "interrupt me when the used index passes this") and
avail_event (device -> driver: "notify me when the available index passes this") are
compared with `vring_need_event`, whose arithmetic is modulo 2^16: the cases that matter
are those where old, new and the event sit on both sides of 0xFFFF -> 0 (as rust-vmm
virtio-queue's tests check).
"""

from __future__ import annotations

import random

import pytest

from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.queue import Queue, vring_need_event
from shared.virtio.testing import MockDriver


def in_window(event: int, new: int, old: int) -> bool:
    """Reference: is `event` one of old, old+1, ..., new-1 (mod 2^16)?"""
    return any((old + step) & 0xFFFF == event for step in range((new - old) & 0xFFFF))


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # the first entry
        (1, 1, 0, False),  # not yet reached: new is one past the last entry published
        (5, 5, 5, False),  # nothing published
        (0xFFFF, 0, 0xFFFF, True),  # the entry just before the wrap
        (0xFFFF, 2, 0xFFFE, True),  # a batch across the wrap, event before it
        (0, 2, 0xFFFE, True),  # ... event at the wrap
        (1, 2, 0xFFFE, True),  # ... event after it
        (2, 2, 0xFFFE, False),  # ... event just past the batch
        (0xFFFD, 2, 0xFFFE, False),  # ... event just before the batch (already signalled)
        (0x7FFE, 0x7FFF, 0xFFFF, True),  # a batch of 2^15 entries, its last one
        (0x8000, 0x7FFF, 0xFFFF, False),
        (0x7FFF, 0x7FFF, 0xFFFF, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected
    assert in_window(event, new, old) is expected


def test_vring_need_event_matches_the_reference_everywhere() -> None:
    rng = random.Random(29)
    for _ in range(3000):
        old = rng.choice([rng.randrange(1 << 16), 0xFFFF - rng.randrange(8), rng.randrange(8)])
        new = (old + rng.randrange(300)) & 0xFFFF
        event = (old + rng.randrange(-10, 310)) & 0xFFFF
        assert vring_need_event(event, new, old) == in_window(event, new, old), (event, new, old)


@pytest.fixture
def wrapped(mem: GuestMemory) -> tuple[MockDriver, Queue]:
    """A driver and queue with EVENT_IDX whose indices stand 3 short of the u16 wrap."""
    driver = MockDriver(mem, size=16, event_idx=True)
    queue = driver.queue()
    start = 0xFFFD
    driver.avail_idx = driver.kicked_idx = driver.last_used = start
    driver.set_avail_idx(start)
    mem.write_u16(driver.used_addr + 2, start)
    queue.next_avail = queue.next_used = start
    return driver, queue


def complete(driver: MockDriver, queue: Queue, count: int) -> None:
    for _ in range(count):
        driver.add_chain([b"x"])
    for _ in range(count):
        chain = queue.pop()
        assert chain is not None
        queue.add_used(chain.head, 0)


@pytest.mark.parametrize(
    ("used_event", "expected"),
    [(0xFFFD, True), (0xFFFF, True), (0, True), (1, True), (2, False), (0xFFFC, False), (0x8000, False)],
)
def test_used_event_across_the_wrap(wrapped: tuple[MockDriver, Queue], used_event: int, expected: bool) -> None:
    driver, queue = wrapped
    driver.set_used_event(used_event)
    complete(driver, queue, 5)  # used index 0xFFFD -> 2
    assert queue.next_used == 2
    assert queue.needs_notification() is expected


def test_one_interrupt_per_crossing_of_used_event(wrapped: tuple[MockDriver, Queue]) -> None:
    driver, queue = wrapped
    driver.set_used_event(0)  # the driver wants to hear once entry 0 (after the wrap) is used
    decisions = []
    for _ in range(6):
        complete(driver, queue, 1)
        decisions.append(queue.needs_notification())
    assert decisions == [False, False, False, True, False, False]  # used 0xFFFE, 0xFFFF, 0, 1, 2, 3


def test_avail_event_suppresses_kicks_while_the_device_drains(wrapped: tuple[MockDriver, Queue]) -> None:
    driver, queue = wrapped
    assert queue.enable_notification() is False  # idle: avail_event = 0xFFFD
    assert driver.avail_event() == 0xFFFD
    driver.add_chain([b"a"])
    assert driver.kick_needed() is True  # 0xFFFD published: the device asked for it
    assert queue.pop() is not None  # the device is draining; it has not re-armed avail_event
    driver.add_chain([b"b"])
    driver.add_chain([b"c"])  # 0xFFFE, 0xFFFF
    assert driver.kick_needed() is False  # no kick: the device will find them before it sleeps
    assert queue.pop() is not None and queue.pop() is not None and queue.pop() is None
    assert queue.enable_notification() is False  # re-armed at 0 (the wrap)
    assert driver.avail_event() == 0
    driver.add_chain([b"d"])
    assert driver.kick_needed() is True
    assert driver.kick_needed() is False  # nothing new since


def test_enable_notification_reports_a_chain_published_before_it_rearmed(
    wrapped: tuple[MockDriver, Queue],
) -> None:
    driver, queue = wrapped
    driver.add_chain([b"a"])
    assert queue.pop() is not None
    driver.add_chain([b"b"])  # published while the device was still draining: no kick
    assert driver.kick_needed() is False
    assert queue.enable_notification() is True  # so the device must look again, not sleep
    assert queue.pop() is not None


def test_without_event_idx_the_flags_decide(mem: GuestMemory) -> None:
    driver = MockDriver(mem, size=16)
    queue = driver.queue()
    queue.disable_notification()
    driver.add_chain([b"a"])
    assert driver.kick_needed() is False
    queue.enable_notification()
    driver.add_chain([b"b"])
    assert driver.kick_needed() is True
    driver.set_avail_flags(c.VIRTQ_AVAIL_F_NO_INTERRUPT)
    complete(driver, queue, 1)
    assert queue.needs_notification() is False
    driver.enable_interrupts()
    complete(driver, queue, 1)
    assert queue.needs_notification() is True


def test_enable_interrupts_moves_used_event_to_what_was_consumed(wrapped: tuple[MockDriver, Queue]) -> None:
    driver, queue = wrapped
    complete(driver, queue, 4)  # used 0xFFFD .. 0
    queue.needs_notification()
    assert len(driver.used()) == 4
    driver.enable_interrupts()
    assert queue.used_event() == 1
    complete(driver, queue, 1)  # used index 1: passes used_event
    assert queue.needs_notification() is True

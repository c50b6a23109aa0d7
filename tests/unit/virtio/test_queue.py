"""Split virtqueue: ring positions, validation of ring state, notifications, persistence."""

from __future__ import annotations

import pytest

from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.queue import Queue, QueueError, is_valid_size
from shared.virtio.testing import MockDriver


def test_pop_on_empty_ring_returns_none(queue: Queue) -> None:
    assert queue.pop() is None


def test_pop_returns_published_chain(driver: MockDriver, queue: Queue) -> None:
    head = driver.add_chain([b"abc"], [8])

    chain = queue.pop()

    assert chain is not None
    assert (chain.head, chain.readable_len, chain.writable_len) == (head, 3, 8)


def test_pop_advances_next_avail(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"abc"])

    queue.pop()

    assert queue.next_avail == 1


def test_pop_on_unready_queue_returns_none(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"abc"])
    queue.ready = False

    assert queue.pop() is None


def test_avail_idx_more_than_queue_size_ahead_raises(driver: MockDriver, queue: Queue) -> None:
    driver.set_avail_idx(driver.size + 1)

    with pytest.raises(QueueError, match="available index"):
        queue.pop()


def test_avail_idx_exactly_queue_size_ahead_is_accepted(driver: MockDriver, queue: Queue) -> None:
    heads = [driver.add_chain([b"x"]) for _ in range(driver.size)]

    assert queue.pending() == len(heads)


def test_avail_idx_wraps_around_u16(driver: MockDriver, queue: Queue) -> None:
    queue.next_avail = 0xFFFF
    driver.avail_idx = 0xFFFF
    driver.add_chain([b"x"])

    assert queue.pending() == 1


def test_head_index_out_of_range_raises(driver: MockDriver, queue: Queue, mem: GuestMemory) -> None:
    mem.write_u16(driver.avail_addr + 4, driver.size)
    driver.set_avail_idx(1)

    with pytest.raises(QueueError, match="head index"):
        queue.pop()


def test_undo_pop_makes_chain_available_again(driver: MockDriver, queue: Queue) -> None:
    head = driver.add_chain([b"abc"])
    queue.pop()

    queue.undo_pop()

    assert queue.pop().head == head  # type: ignore[union-attr]


def test_add_used_publishes_entry(driver: MockDriver, queue: Queue) -> None:
    head = driver.add_chain([b"abc"], [4])
    queue.pop()

    queue.add_used(head, 4)

    assert driver.used() == [(head, 4)]


def test_add_used_wraps_the_used_ring(driver: MockDriver, queue: Queue) -> None:
    queue.next_used = driver.size - 1
    driver.last_used = driver.size - 1

    queue.add_used(1, 0)
    queue.add_used(2, 0)

    assert driver.used() == [(1, 0), (2, 0)]


def test_add_used_with_foreign_head_is_a_device_bug(queue: Queue) -> None:
    with pytest.raises(ValueError):
        queue.add_used(queue.size, 0)


# --- notifications -----------------------------------------------------------------------


def test_needs_notification_false_when_nothing_added(queue: Queue) -> None:
    assert queue.needs_notification() is False


def test_needs_notification_true_after_add_used(queue: Queue) -> None:
    queue.add_used(0, 0)

    assert queue.needs_notification() is True


def test_needs_notification_honours_no_interrupt_flag(driver: MockDriver, queue: Queue) -> None:
    driver.set_avail_flags(c.VIRTQ_AVAIL_F_NO_INTERRUPT)
    queue.add_used(0, 0)

    assert queue.needs_notification() is False


def test_needs_notification_resets_after_call(queue: Queue) -> None:
    queue.add_used(0, 0)
    queue.needs_notification()

    assert queue.needs_notification() is False


@pytest.fixture
def evq(mem: GuestMemory) -> tuple[MockDriver, Queue]:
    driver = MockDriver(mem, size=16, event_idx=True)
    return driver, driver.queue()


def test_event_idx_notifies_when_used_event_is_crossed(evq: tuple[MockDriver, Queue]) -> None:
    driver, queue = evq
    driver.set_used_event(0)

    queue.add_used(0, 0)

    assert queue.needs_notification() is True


def test_event_idx_suppresses_when_used_event_is_ahead(evq: tuple[MockDriver, Queue]) -> None:
    driver, queue = evq
    driver.set_used_event(5)

    queue.add_used(0, 0)

    assert queue.needs_notification() is False


def test_event_idx_notifies_when_batch_crosses_used_event(evq: tuple[MockDriver, Queue]) -> None:
    driver, queue = evq
    driver.set_used_event(2)

    for head in range(4):
        queue.add_used(head, 0)

    assert queue.needs_notification() is True


def test_event_idx_ignores_no_interrupt_flag(evq: tuple[MockDriver, Queue]) -> None:
    driver, queue = evq
    driver.set_avail_flags(c.VIRTQ_AVAIL_F_NO_INTERRUPT)
    driver.set_used_event(0)

    queue.add_used(0, 0)

    assert queue.needs_notification() is True


def test_enable_notification_publishes_avail_event(evq: tuple[MockDriver, Queue]) -> None:
    driver, queue = evq
    driver.add_chain([b"x"])
    queue.pop()

    queue.enable_notification()

    assert driver.avail_event() == 1


def test_enable_notification_reports_chains_that_arrived(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"x"])

    assert queue.enable_notification() is True


def test_enable_notification_false_on_empty_ring(queue: Queue) -> None:
    assert queue.enable_notification() is False


def test_enable_notification_clears_no_notify_flag(driver: MockDriver, queue: Queue) -> None:
    queue.disable_notification()

    queue.enable_notification()

    assert driver.used_flags() == 0


def test_disable_notification_sets_no_notify_flag(driver: MockDriver, queue: Queue) -> None:
    queue.disable_notification()

    assert driver.used_flags() == c.VIRTQ_USED_F_NO_NOTIFY


# --- setup checks ------------------------------------------------------------------------


def test_check_accepts_mock_layout(queue: Queue) -> None:
    queue.check()


@pytest.mark.parametrize("size", [0, 3, 512])
def test_check_rejects_bad_size(queue: Queue, size: int) -> None:
    queue.size = size

    with pytest.raises(QueueError, match="queue size"):
        queue.check()


@pytest.mark.parametrize(
    ("field", "offset", "what"),
    [("desc_addr", 8, "descriptor table"), ("avail_addr", 1, "available ring"), ("used_addr", 2, "used ring")],
)
def test_check_rejects_misaligned_ring(queue: Queue, field: str, offset: int, what: str) -> None:
    setattr(queue, field, getattr(queue, field) + offset)

    with pytest.raises(QueueError, match=f"{what}.*aligned"):
        queue.check()


def test_check_rejects_ring_outside_memory(queue: Queue, mem: GuestMemory) -> None:
    queue.used_addr = mem.size - 8

    with pytest.raises(QueueError, match="outside guest memory"):
        queue.check()


def test_queue_max_size_must_be_power_of_two(mem: GuestMemory) -> None:
    with pytest.raises(ValueError):
        Queue(mem, 100)


@pytest.mark.parametrize(("size", "valid"), [(1, True), (256, True), (32768, True), (65536, False), (0, False)])
def test_is_valid_size(size: int, valid: bool) -> None:
    assert is_valid_size(size) is valid


# --- persistence -------------------------------------------------------------------------


def test_snapshot_restore_round_trip(driver: MockDriver, queue: Queue, mem: GuestMemory) -> None:
    driver.add_chain([b"x"])
    queue.pop()
    fresh = Queue(mem, queue.max_size)

    fresh.restore(queue.snapshot())

    assert fresh.snapshot() == queue.snapshot()


def test_restore_rejects_other_max_size(queue: Queue, mem: GuestMemory) -> None:
    with pytest.raises(ValueError):
        Queue(mem, 32).restore(queue.snapshot())


def test_resync_takes_positions_from_used_ring(driver: MockDriver, queue: Queue) -> None:
    head = driver.add_chain([b"x"])
    driver.add_chain([b"y"])
    queue.pop()
    queue.add_used(head, 0)
    queue.pop()

    queue.resync_from_used_ring()

    assert (queue.next_avail, queue.next_used) == (1, 1)


def test_reset_forgets_setup(queue: Queue) -> None:
    queue.reset()

    assert (queue.ready, queue.desc_addr, queue.size) == (False, 0, queue.max_size)

"""Chain walking: every malformed chain a guest can build is refused, never followed."""

from __future__ import annotations

import pytest

from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.chain import ChainError, Segment, walk_chain
from shared.virtio.queue import Queue
from shared.virtio.testing import MockDriver

NEXT, WRITE, INDIRECT = c.VIRTQ_DESC_F_NEXT, c.VIRTQ_DESC_F_WRITE, c.VIRTQ_DESC_F_INDIRECT


def pop_raw(driver: MockDriver, queue: Queue, head: int = 0) -> object:
    driver.publish(head)
    return queue.pop()


def test_chain_keeps_readable_then_writable(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"ab", b"cd"], [4])

    chain = queue.pop()

    assert [d.writable for d in chain] == [False, False, True]  # type: ignore[union-attr]


def test_loop_in_next_links_is_refused(driver: MockDriver, queue: Queue) -> None:
    buf = driver.alloc(8)
    driver.write_descriptor(0, buf, 8, NEXT, 1)
    driver.write_descriptor(1, buf, 8, NEXT, 0)

    with pytest.raises(ChainError, match="more than 16 descriptors"):
        pop_raw(driver, queue)


def test_self_loop_is_refused(driver: MockDriver, queue: Queue) -> None:
    driver.write_descriptor(0, driver.alloc(8), 8, NEXT, 0)

    with pytest.raises(ChainError, match="a loop"):
        pop_raw(driver, queue)


def test_chain_of_exactly_queue_size_is_accepted(driver: MockDriver, queue: Queue) -> None:
    buf = driver.alloc(8)
    for i in range(driver.size - 1):
        driver.write_descriptor(i, buf, 8, NEXT, i + 1)
    driver.write_descriptor(driver.size - 1, buf, 8)

    chain = pop_raw(driver, queue)

    assert len(chain) == driver.size  # type: ignore[arg-type]


def test_next_index_out_of_range_is_refused(driver: MockDriver, queue: Queue) -> None:
    driver.write_descriptor(0, driver.alloc(8), 8, NEXT, driver.size)

    with pytest.raises(ChainError, match="next index 16 is out of range"):
        pop_raw(driver, queue)


def test_buffer_outside_memory_is_refused(driver: MockDriver, queue: Queue, mem: GuestMemory) -> None:
    driver.write_descriptor(0, mem.size - 4, 8)

    with pytest.raises(ChainError, match="outside guest memory"):
        pop_raw(driver, queue)


def test_buffer_at_huge_address_is_refused(driver: MockDriver, queue: Queue) -> None:
    driver.write_descriptor(0, 0xFFFF_FFFF_FFFF_FFF0, 0xFFFF_FFFF)

    with pytest.raises(ChainError, match="outside guest memory"):
        pop_raw(driver, queue)


def test_zero_length_buffer_is_accepted(driver: MockDriver, queue: Queue) -> None:
    driver.write_descriptor(0, driver.alloc(8), 0)

    chain = pop_raw(driver, queue)

    assert chain.readable_len == 0  # type: ignore[attr-defined]


def test_readable_after_writable_is_refused(driver: MockDriver, queue: Queue) -> None:
    buf = driver.alloc(8)
    driver.write_descriptor(0, buf, 8, NEXT | WRITE, 1)
    driver.write_descriptor(1, buf, 8)

    with pytest.raises(ChainError, match="readable descriptor after a device-writable"):
        pop_raw(driver, queue)


def test_chain_error_names_the_head(driver: MockDriver, queue: Queue) -> None:
    driver.write_descriptor(3, driver.alloc(8), 8, NEXT, 99)

    with pytest.raises(ChainError) as info:
        pop_raw(driver, queue, head=3)

    assert info.value.head == 3


def test_chain_error_consumes_the_head(driver: MockDriver, queue: Queue) -> None:
    driver.write_descriptor(0, driver.alloc(8), 8, NEXT, 99)
    with pytest.raises(ChainError):
        pop_raw(driver, queue)

    assert queue.pending() == 0


def test_chain_longer_than_4_gib_is_refused(mem: GuestMemory) -> None:
    driver = MockDriver(mem, size=512)
    queue = driver.queue()
    for i in range(256):  # 257 overlapping views of all of guest memory: 4 GiB + 16 MiB
        driver.write_descriptor(i, 0, mem.size, NEXT, i + 1)
    driver.write_descriptor(256, 0, mem.size)

    with pytest.raises(ChainError, match="longer than 2"):
        pop_raw(driver, queue)


def test_guest_rewriting_descriptor_after_pop_changes_nothing(
    driver: MockDriver, queue: Queue, mem: GuestMemory
) -> None:
    head = driver.add_chain([b"abcd"])
    chain = queue.pop()

    driver.write_descriptor(head, mem.size - 1, 0xFFFF, WRITE)

    assert chain.descriptors[0].length == 4  # type: ignore[union-attr]


# --- indirect descriptors -----------------------------------------------------------------


@pytest.fixture
def ind(mem: GuestMemory) -> tuple[MockDriver, Queue]:
    driver = MockDriver(mem, size=16, indirect=True)
    return driver, driver.queue()


def test_indirect_chain_is_flattened(ind: tuple[MockDriver, Queue]) -> None:
    driver, queue = ind
    driver.add_chain([b"hdr"], [4, 1], indirect=True)

    chain = queue.pop()

    assert [(d.length, d.writable) for d in chain] == [(3, False), (4, True), (1, True)]  # type: ignore[union-attr]


def test_indirect_without_feature_is_refused(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"hdr"], indirect=True)

    with pytest.raises(ChainError, match="not negotiated"):
        queue.pop()


def test_direct_descriptors_before_indirect_are_kept(ind: tuple[MockDriver, Queue]) -> None:
    driver, queue = ind
    buf = driver.alloc(8)
    table = driver.write_indirect_table([(buf, 2, WRITE, 0)])
    driver.write_descriptor(0, buf, 1, NEXT, 1)
    driver.write_descriptor(1, table, 16, INDIRECT)

    chain = pop_raw(driver, queue)

    assert [(d.length, d.writable) for d in chain] == [(1, False), (2, True)]  # type: ignore[attr-defined]


def test_nested_indirect_is_refused(ind: tuple[MockDriver, Queue]) -> None:
    driver, queue = ind
    inner = driver.write_indirect_table([(driver.alloc(8), 8, 0, 0)])
    outer = driver.write_indirect_table([(inner, 16, INDIRECT, 0)])
    driver.write_descriptor(0, outer, 16, INDIRECT)

    with pytest.raises(ChainError, match="nested indirect"):
        pop_raw(driver, queue)


def test_indirect_with_next_is_refused(ind: tuple[MockDriver, Queue]) -> None:
    driver, queue = ind
    table = driver.write_indirect_table([(driver.alloc(8), 8, 0, 0)])
    driver.write_descriptor(0, table, 16, INDIRECT | NEXT, 1)

    with pytest.raises(ChainError, match="also has NEXT"):
        pop_raw(driver, queue)


@pytest.mark.parametrize("length", [0, 8, 17])
def test_indirect_table_length_must_be_multiple_of_16(ind: tuple[MockDriver, Queue], length: int) -> None:
    driver, queue = ind
    driver.write_descriptor(0, driver.alloc(32), length, INDIRECT)

    with pytest.raises(ChainError, match="not a non-zero multiple of 16"):
        pop_raw(driver, queue)


def test_indirect_table_outside_memory_is_refused(ind: tuple[MockDriver, Queue], mem: GuestMemory) -> None:
    driver, queue = ind
    driver.write_descriptor(0, mem.size - 16, 32, INDIRECT)

    with pytest.raises(ChainError, match=r"indirect table .* outside guest memory"):
        pop_raw(driver, queue)


def test_indirect_next_out_of_table_is_refused(ind: tuple[MockDriver, Queue]) -> None:
    driver, queue = ind
    table = driver.write_indirect_table([(driver.alloc(8), 8, NEXT, 1)])
    driver.write_descriptor(0, table, 16, INDIRECT)

    with pytest.raises(ChainError, match="next index 1 is out of range"):
        pop_raw(driver, queue)


def test_indirect_loop_is_refused(ind: tuple[MockDriver, Queue]) -> None:
    driver, queue = ind
    buf = driver.alloc(8)
    table = driver.write_indirect_table([(buf, 8, NEXT, 1), (buf, 8, NEXT, 0)])
    driver.write_descriptor(0, table, 32, INDIRECT)

    with pytest.raises(ChainError, match="a loop"):
        pop_raw(driver, queue)


def test_indirect_table_longer_than_the_queue_is_refused_not_followed(ind: tuple[MockDriver, Queue]) -> None:
    """A huge indirect table (64 Ki entries, no loop) yields no more than queue-size descriptors."""
    driver, queue = ind
    buf = driver.alloc(8)
    entries = 1 << 16
    table = driver.write_indirect_table([(buf, 8, NEXT, i + 1) for i in range(entries - 1)] + [(buf, 8, 0, 0)])
    driver.write_descriptor(0, table, 16 * entries, INDIRECT)

    with pytest.raises(ChainError, match="more than 16 descriptors"):
        pop_raw(driver, queue)


def test_walk_chain_reads_descriptor_table_outside_memory_as_error(mem: GuestMemory) -> None:
    with pytest.raises(ChainError, match="descriptor 0 lies outside"):
        walk_chain(mem, mem.size, 16, 0, indirect_ok=False)


# --- reader and writer --------------------------------------------------------------------


def test_reader_reads_across_descriptors(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"hel", b"lo"])
    reader = queue.pop().reader()  # type: ignore[union-attr]

    assert reader.read(5) == b"hello"


def test_reader_past_the_end_is_a_guest_error(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"abc"])
    reader = queue.pop().reader()  # type: ignore[union-attr]

    with pytest.raises(ChainError, match="needs 4 more bytes"):
        reader.read(4)


def test_reader_segments_split_at_descriptor_boundaries(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"abc", b"defg"])
    chain = queue.pop()
    first, second = chain.readable  # type: ignore[union-attr]
    reader = chain.reader()  # type: ignore[union-attr]
    reader.skip(1)

    segments = reader.segments(4)

    assert segments == [Segment(first.addr + 1, 2), Segment(second.addr, 2)]


def test_reader_ignores_writable_buffers(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([b"ab"], [8])

    assert queue.pop().reader().remaining == 2  # type: ignore[union-attr]


def test_writer_writes_across_descriptors(driver: MockDriver, queue: Queue) -> None:
    head = driver.add_chain([], [2, 3])
    writer = queue.pop().writer()  # type: ignore[union-attr]

    writer.write(b"hello")

    assert driver.written(head) == [b"he", b"llo"]


def test_writer_overflow_is_a_guest_error(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([], [2])
    writer = queue.pop().writer()  # type: ignore[union-attr]

    with pytest.raises(ChainError):
        writer.write(b"abc")


def test_writer_views_are_zero_copy(driver: MockDriver, queue: Queue) -> None:
    head = driver.add_chain([], [4])
    (view,) = queue.pop().writer().views(4)  # type: ignore[union-attr]

    view[:] = b"wxyz"

    assert driver.written(head) == [b"wxyz"]


def test_writer_counts_bytes_written(driver: MockDriver, queue: Queue) -> None:
    driver.add_chain([], [4, 4])
    writer = queue.pop().writer()  # type: ignore[union-attr]

    writer.skip(5)

    assert (writer.bytes_written, writer.remaining) == (5, 3)

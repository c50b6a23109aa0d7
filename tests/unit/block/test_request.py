"""Parsing chains into block requests: layout-agnostic, guest errors named."""

from __future__ import annotations

import pytest

from devices.block.request import Request, RequestError, RequestType, parse_request
from shared.virtio.queue import Queue
from shared.virtio.testing import MockDriver
from tests.unit.block.conftest import header


def parse(driver: MockDriver, queue: Queue, readable: list[bytes], writable: list[int]) -> Request:
    driver.add_chain(readable, writable)
    chain = queue.pop()
    assert chain is not None
    return parse_request(chain)


def test_header_fields_are_parsed(driver: MockDriver, queue: Queue) -> None:
    request = parse(driver, queue, [header(RequestType.IN, 42)], [512, 1])

    assert (request.type, request.sector, request.offset) == (RequestType.IN, 42, 42 * 512)


def test_in_data_excludes_the_status_byte(driver: MockDriver, queue: Queue) -> None:
    request = parse(driver, queue, [header(RequestType.IN)], [1024, 1])

    assert request.data_len == 1024


def test_status_is_the_last_writable_byte(driver: MockDriver, queue: Queue) -> None:
    head = driver.add_chain([header(RequestType.IN)], [513])

    request = parse_request(queue.pop())  # type: ignore[arg-type]

    assert request.status_addr == driver.buffers(head)[-1].addr + 512


def test_out_data_is_the_readable_rest(driver: MockDriver, queue: Queue) -> None:
    request = parse(driver, queue, [header(RequestType.OUT), b"a" * 512, b"b" * 512], [1])

    assert request.data_len == 1024


def test_header_split_across_descriptors_is_accepted(driver: MockDriver, queue: Queue) -> None:
    raw = header(RequestType.OUT, 7)

    request = parse(driver, queue, [raw[:5], raw[5:] + b"x" * 512], [1])

    assert (request.sector, request.data_len) == (7, 512)


def test_used_len_is_all_writable_bytes(driver: MockDriver, queue: Queue) -> None:
    request = parse(driver, queue, [header(RequestType.IN)], [512, 1])

    assert request.used_len == 513


def test_flush_has_no_data(driver: MockDriver, queue: Queue) -> None:
    request = parse(driver, queue, [header(RequestType.FLUSH)], [1])

    assert request.data == ()


def test_unknown_type_is_parsed_for_unsupp(driver: MockDriver, queue: Queue) -> None:
    request = parse(driver, queue, [header(99)], [1])

    assert request.type == 99


def test_chain_without_writable_byte_is_refused(driver: MockDriver, queue: Queue) -> None:
    with pytest.raises(RequestError, match="no writable byte") as info:
        parse(driver, queue, [header(RequestType.OUT)], [])

    assert info.value.status_addr is None


def test_zero_length_status_descriptor_is_refused(driver: MockDriver, queue: Queue) -> None:
    with pytest.raises(RequestError, match="no writable byte"):
        parse(driver, queue, [header(RequestType.FLUSH)], [0])


def test_short_header_is_refused_with_status_address(driver: MockDriver, queue: Queue) -> None:
    with pytest.raises(RequestError, match="header shorter") as info:
        parse(driver, queue, [b"\0" * 8], [1])

    assert info.value.status_addr is not None


def test_data_not_multiple_of_sector_is_refused(driver: MockDriver, queue: Queue) -> None:
    with pytest.raises(RequestError, match="not a multiple of 512"):
        parse(driver, queue, [header(RequestType.IN)], [100, 1])

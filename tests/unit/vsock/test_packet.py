"""Packet headers and parsing a tx chain."""

from __future__ import annotations

import pytest

from devices.vsock.packet import HEADER_SIZE, MAX_PKT_BUF_SIZE, Header, Op, PacketError, header_bytes, parse_tx
from shared.virtio.testing import MockDriver, make_guest_memory


@pytest.fixture
def driver():
    mem = make_guest_memory()
    yield MockDriver(mem)
    mem.close()


def pop(driver: MockDriver, *buffers: bytes):
    driver.add_chain(list(buffers))
    chain = driver.queue().pop()
    assert chain is not None
    return chain


def test_header_is_44_bytes_little_endian_in_spec_order() -> None:
    raw = header_bytes(3, 2, 1024, 52, Op.RW, length=5, flags=0, buf_alloc=4096, fwd_cnt=7)

    assert len(raw) == HEADER_SIZE == 44
    assert raw[:8] == (3).to_bytes(8, "little") and raw[8:16] == (2).to_bytes(8, "little")
    assert raw[24:28] == (5).to_bytes(4, "little")  # len
    assert raw[30:32] == (Op.RW).to_bytes(2, "little")  # op after type
    assert Header.unpack(raw) == Header(3, 2, 1024, 52, 5, 1, Op.RW, 0, 4096, 7)


def test_header_and_payload_may_be_split_across_descriptors(driver) -> None:
    raw = header_bytes(3, 2, 1, 2, Op.RW, length=6)
    pkt = parse_tx(pop(driver, raw[:10], raw[10:] + b"abc", b"def"))

    assert pkt.header.len == 6
    assert b"".join(bytes(v) for v in pkt.payload) == b"abcdef"


@pytest.mark.parametrize(
    ("buffers", "reason"),
    [
        ([b"\0" * 43], "shorter than a packet header"),
        ([header_bytes(3, 2, 1, 2, Op.RW, length=10) + b"short"], "the chain holds 5"),
        ([header_bytes(3, 2, 1, 2, Op.RW, length=MAX_PKT_BUF_SIZE + 1)], "over 65536"),
        ([header_bytes(3, 2, 1, 2, Op.REQUEST, length=3) + b"abc"], "carries 3 payload bytes"),
    ],
)
def test_malformed_packets_are_refused_with_the_reason(driver, buffers, reason) -> None:
    with pytest.raises(PacketError, match=reason):
        parse_tx(pop(driver, *buffers))

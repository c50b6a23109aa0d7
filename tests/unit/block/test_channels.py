"""The messages and the fd channel the block worker is driven by."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from shared import fdpass
from shared import protocol as p


def test_rate_limiter_update_round_trips_with_and_without_buckets() -> None:
    msg = p.UpdateRateLimiter(1, {"size": 10, "refill_time": 100}, None)

    assert p.decode(p.encode(msg)) == msg


def test_optional_field_still_rejects_the_wrong_type() -> None:
    body = {"type": "update_rate_limiter", "request_id": 1, "bandwidth": "fast", "ops": None}

    with pytest.raises(p.ProtocolError, match="wrong type"):
        p.decode(msgpack.packb(body))


def test_mmio_messages_round_trip() -> None:
    for msg in (p.MmioRead(1, 0x70, 4), p.MmioWrite(2, 0x50, 4, 0), p.MmioDone(2, 0xFFFFFFFF)):
        assert p.decode(p.encode(msg)) == msg


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = fdpass.channel_pair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_message_and_fd_arrive_together(pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    ours, theirs = pair
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)

    fdpass.send_message(ours, p.ReplaceBackingFile(5), [fd])
    os.close(fd)
    received = fdpass.recv_message(theirs)

    assert received is not None
    msg, fds = received
    assert msg == p.ReplaceBackingFile(5) and os.readlink(f"/proc/self/fd/{fds[0]}") == str(path)
    os.close(fds[0])


def test_garbage_with_fds_closes_them_before_raising(pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    ours, theirs = pair
    fd = os.open(tmp_path, os.O_RDONLY)
    socket.send_fds(ours, [b"\xc1"], [fd])
    os.close(fd)
    before = set(os.listdir("/proc/self/fd"))

    with pytest.raises(fdpass.FdChannelError):
        fdpass.recv_message(theirs)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_closed_channel_reads_as_none(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    ours.close()

    assert fdpass.recv_message(theirs) is None

"""virtio-blk requests (spec 5.2.6): a descriptor chain parsed into a `Request`. Pure.

Layout-agnostic, as virtio 1.0 requires: the 16-byte header is the first 16 readable
bytes, the status byte is the last writable byte, and the data is what lies between
(the remaining readable bytes for OUT, the writable bytes before the status for IN and
GET_ID) however the driver split it into descriptors.

Parsing reads only the header out of guest memory (a copy); data stays in guest memory
as address ranges for the executor to turn into views. Nothing here does I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

from shared.virtio.chain import ChainError, Descriptor, DescriptorChain, Segment

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
HEADER = struct.Struct("<IIQ")  # type, reserved, sector
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES


class RequestType(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class Status(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class RequestError(Exception):
    """The guest sent a malformed block request.

    `status_addr` is where the status byte goes when the chain has one (so the driver
    can still be told IOERR), else None.
    """

    def __init__(self, reason: str, status_addr: int | None) -> None:
        super().__init__(f"Guest sent a bad block request: {reason}")
        self.status_addr = status_addr


class Request(NamedTuple):
    """One parsed request. `type` is the raw value: unknown types are answered UNSUPP.
    (A NamedTuple: one is made per request on the data path.)"""

    type: int
    sector: int
    data: tuple[Segment, ...]
    status_addr: int
    used_len: int
    data_len: int

    @property
    def offset(self) -> int:
        """Byte offset on the disk."""
        return self.sector << SECTOR_SHIFT


_IN, _OUT, _GET_ID = int(RequestType.IN), int(RequestType.OUT), int(RequestType.GET_ID)


def _segments(descriptors: Sequence[Descriptor], skip: int, take: int) -> list[Segment]:
    """`take` bytes of `descriptors` after the first `skip`, as segments (the caller has
    checked that they hold that many)."""
    segments: list[Segment] = []
    for addr, length, _ in descriptors:
        if skip >= length:
            skip -= length
            continue
        step = min(length - skip, take)
        if step:
            segments.append(Segment(addr + skip, step))
        take -= step
        skip = 0
        if not take:
            break
    return segments


def parse_request(chain: DescriptorChain) -> Request:
    """Parse `chain`; raises RequestError (the guest's fault)."""
    readable, writable = chain.readable_descs, chain.writable_descs
    status_addr = None
    for desc in reversed(writable):
        if desc.length:
            status_addr = desc.addr + desc.length - 1
            break
    if status_addr is None:
        raise RequestError("no writable byte for the status", None)
    readable_len, writable_len = chain.readable_len, chain.writable_len
    if readable and readable[0].length >= HEADER.size:  # the usual layout: one header buffer
        kind, _reserved, sector = HEADER.unpack(chain.mem.read(readable[0].addr, HEADER.size))
    else:
        try:
            kind, _reserved, sector = HEADER.unpack(chain.reader().read(HEADER.size))
        except ChainError as e:
            raise RequestError(f"header shorter than {HEADER.size} bytes", status_addr) from e
    data: list[Segment] = []
    data_len = 0
    if kind == _OUT:
        data_len = readable_len - HEADER.size
        data = _segments(readable, HEADER.size, data_len)
    elif kind in (_IN, _GET_ID):
        data_len = writable_len - 1
        data = _segments(writable, 0, data_len)
    if kind in (_IN, _OUT) and data_len % SECTOR_SIZE:
        raise RequestError(f"data length {data_len} is not a multiple of {SECTOR_SIZE}", status_addr)
    return Request(kind, sector, tuple(data), status_addr, writable_len, data_len)

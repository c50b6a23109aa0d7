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
from dataclasses import dataclass
from enum import IntEnum

from shared.virtio.chain import ChainError, DescriptorChain, Segment

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


@dataclass(frozen=True)
class Request:
    """One parsed request. `type` is the raw value: unknown types are answered UNSUPP."""

    type: int
    sector: int
    data: tuple[Segment, ...]
    status_addr: int
    used_len: int

    @property
    def data_len(self) -> int:
        return sum(s.length for s in self.data)

    @property
    def offset(self) -> int:
        """Byte offset on the disk."""
        return self.sector << SECTOR_SHIFT


def _status_addr(chain: DescriptorChain) -> int:
    for desc in reversed(chain.writable):
        if desc.length:
            return desc.addr + desc.length - 1
    raise RequestError("no writable byte for the status", None)


def parse_request(chain: DescriptorChain) -> Request:
    """Parse `chain`; raises RequestError (the guest's fault)."""
    status_addr = _status_addr(chain)
    reader, writer = chain.reader(), chain.writer()
    try:
        kind, _reserved, sector = HEADER.unpack(reader.read(HEADER.size))
    except ChainError as e:
        raise RequestError(f"header shorter than {HEADER.size} bytes", status_addr) from e
    data: list[Segment] = []
    if kind == RequestType.OUT:
        data = reader.segments(reader.remaining)
    elif kind in (RequestType.IN, RequestType.GET_ID):
        data = writer.segments(writer.remaining - 1)
    request = Request(kind, sector, tuple(data), status_addr, chain.writable_len)
    if kind in (RequestType.IN, RequestType.OUT) and request.data_len % SECTOR_SIZE:
        raise RequestError(f"data length {request.data_len} is not a multiple of {SECTOR_SIZE}", status_addr)
    return request

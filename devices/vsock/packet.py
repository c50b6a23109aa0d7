"""virtio-vsock packets (spec 5.10.6): the 44-byte header, its constants, parsing a tx chain.

Every packet starts with `struct virtio_vsock_hdr` (little-endian, packed):

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len;
    le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

followed by `len` bytes of payload (RW only). A tx chain's readable buffers hold the
header and the payload, split across descriptors any way the driver likes; an rx chain's
writable buffers receive them the same way.

`parse_tx` copies the header out once (the guest may rewrite its buffers afterwards) and
checks it; the payload stays in guest memory and is handed on as views, so it reaches the
host socket with one copy (sendmsg from guest memory).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from shared.virtio.chain import ChainError, DescriptorChain

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
assert HEADER_SIZE == 44

HOST_CID = 2  # VMADDR_CID_HOST
TYPE_STREAM = 1
TYPE_SEQPACKET = 2  # not offered (VIRTIO_VSOCK_F_SEQPACKET), answered with RST
MAX_PKT_BUF_SIZE = 64 * 1024  # Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE; longer payloads are malformed

SHUTDOWN_RCV = 1  # the sender will receive no more
SHUTDOWN_SEND = 2  # the sender will send no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

EVENT_TRANSPORT_RESET = 0  # virtio_vsock_event.id
EVENT = struct.Struct("<I")


class Op(IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


KNOWN_OPS = frozenset(int(op) for op in Op if op is not Op.INVALID)


class PacketError(Exception):
    """A tx chain does not hold a well-formed packet (the guest's fault): it is dropped."""


@dataclass(frozen=True, slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        return cls(*HEADER.unpack(raw))


def header_bytes(
    src_cid: int,
    dst_cid: int,
    src_port: int,
    dst_port: int,
    op: int,
    *,
    length: int = 0,
    flags: int = 0,
    buf_alloc: int = 0,
    fwd_cnt: int = 0,
    type_: int = TYPE_STREAM,
) -> bytes:
    """A packed header (tests and the device's own packets)."""
    return HEADER.pack(
        src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc & 0xFFFFFFFF, fwd_cnt & 0xFFFFFFFF
    )


@dataclass(frozen=True, slots=True)
class TxPacket:
    """A packet the guest sent: its header (a copy) and its payload (views of guest memory)."""

    header: Header
    payload: list[memoryview]


def parse_tx(chain: DescriptorChain) -> TxPacket:
    """The packet in `chain`'s readable buffers; PacketError if it is malformed."""
    reader = chain.reader()
    try:
        header = Header.unpack(reader.read(HEADER_SIZE))
    except ChainError as e:
        raise PacketError(f"tx chain (head {chain.head}) is shorter than a packet header") from e
    if header.len > MAX_PKT_BUF_SIZE:
        raise PacketError(f"packet payload length {header.len} is over {MAX_PKT_BUF_SIZE}")
    if header.len and header.op != Op.RW:
        raise PacketError(f"op {header.op} packet carries {header.len} payload bytes")
    try:
        payload = reader.views(header.len)
    except ChainError as e:
        raise PacketError(f"packet says {header.len} payload bytes, the chain holds {reader.remaining}") from e
    return TxPacket(header, payload)

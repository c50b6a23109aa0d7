"""The vsock worker's durable connection table, in its device's state area (`shared.devstate`).

A vsock worker may die at any instant; the supervisor keeps every host stream socket it
handed over (`controlplane.vsock_sockets`), so the host peer sees nothing, and the
replacement rebuilds each connection from this table: ports, state, credit counters and
byte counters (docs/faults.md, "Vsock connections").

One record per connection, at a fixed index (`MAX_RECORDS` of them), each in two copies:
a write goes to the older copy (payload, then its generation and crc), so a worker killed
mid-write leaves the other copy readable, and a reader takes the valid copy with the
highest generation. A record holds two states of the connection, `pre` and `post`, and an
`intent`:

* no intent: `post` is the connection;
* RX intent U: an rx packet for this connection was written into the guest's buffer and
  its used-ring entry goes to used index U. `pre` is the connection before that packet,
  `post` after. If the guest's used index is past U the packet was published: `post` holds
  (and its bytes, peeked from the host socket, are consumed if the socket's SO_PEEK_OFF
  says they were not yet); otherwise `pre` holds and the peek offset goes back to 0;
* TX intent A: the guest's RW packet at avail position A is being written to the host
  socket (`sendmsg` and this table cannot change together): if the worker died there,
  nobody knows how many bytes went out, so the replacement resets that connection.

Word 0 of the region: `0x80000000 | (A + 1)` after the tx packet at avail position A was
applied (`tx_applied`): a replacement does not apply it again.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

# Off: a replacement resets every connection (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) and the
# supervisor keeps no host socket, as before issue 18.
RESUME_CONNECTIONS = True

MAX_RECORDS = 1024
HEADER_BYTES = 64
_TX_APPLIED = struct.Struct("<I")
# a connection's durable fields (Connection.record / Connection.from_record)
FIELDS = (
    "in_use",
    "sock_id",
    "local_port",
    "peer_port",
    "state",
    "bits",
    "shutdown_flags",
    "buf_alloc",
    "tx_recv_cnt",
    "fwd_cnt",
    "last_fwd_cnt_sent",
    "peer_buf_alloc",
    "peer_fwd_cnt",
    "rx_cnt",
    "tx_buf_len",
    "host_prefix_len",
    "tx_pos",
    "held_pos",
    "held_sent",
)
STATE = struct.Struct("<" + "I" * len(FIELDS))
_COPY_HEADER = struct.Struct("<QII")  # generation, crc32 of the rest, intent
_INTENT_ARG = struct.Struct("<I")
COPY_BYTES = 256
RECORD_BYTES = 2 * COPY_BYTES
_PAYLOAD_OFFSET = _COPY_HEADER.size + _INTENT_ARG.size
assert _PAYLOAD_OFFSET + 2 * STATE.size <= COPY_BYTES
REGION_BYTES = HEADER_BYTES + MAX_RECORDS * RECORD_BYTES

NO_INTENT, RX_INTENT, TX_INTENT = 0, 1, 2


@dataclass(frozen=True)
class Record:
    """One connection as the table last saw it."""

    pre: tuple[int, ...]
    post: tuple[int, ...]
    intent: int = NO_INTENT
    arg: int = 0  # the used index (RX_INTENT) or the avail position (TX_INTENT)

    def field(self, name: str, which: str = "post") -> int:
        return (self.post if which == "post" else self.pre)[FIELDS.index(name)]


class ConnTable:
    """The table over `region` (a writable memoryview of at least REGION_BYTES)."""

    def __init__(self, region: memoryview) -> None:
        if len(region) < REGION_BYTES:
            raise ValueError(f"the connection table needs {REGION_BYTES} bytes, got {len(region)}")
        self._mem = region
        self._gens = [max(self._generation(i, 0), self._generation(i, 1)) for i in range(MAX_RECORDS)]
        self._free = [i for i in range(MAX_RECORDS - 1, -1, -1) if self.read(i) is None]

    # --- slots -------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A free record index, or None when the table is full (the connection is then not durable)."""
        return self._free.pop() if self._free else None

    def release(self, index: int) -> None:
        self.write(index, (0,) * len(FIELDS))
        self._free.append(index)

    # --- writing -------------------------------------------------------------------------
    def write(
        self,
        index: int,
        post: tuple[int, ...],
        intent: int = NO_INTENT,
        arg: int = 0,
        pre: tuple[int, ...] | None = None,
    ) -> None:
        body = _INTENT_ARG.pack(arg & 0xFFFFFFFF) + STATE.pack(*(pre if pre is not None else post)) + STATE.pack(*post)
        self._gens[index] += 1
        generation = self._gens[index]
        copy = 0 if self._generation(index, 0) <= self._generation(index, 1) else 1
        base = self._copy_base(index, copy)
        self._mem[base + _COPY_HEADER.size : base + _COPY_HEADER.size + len(body)] = body
        crc = zlib.crc32(struct.pack("<QI", generation, intent) + body)
        _COPY_HEADER.pack_into(self._mem, base, generation, crc, intent)

    def set_tx_applied(self, position: int) -> None:
        _TX_APPLIED.pack_into(self._mem, 0, 0x80000000 | ((position + 1) & 0xFFFF))

    # --- reading -------------------------------------------------------------------------
    def tx_applied(self) -> int | None:
        """The avail position after the last tx packet applied, if any was."""
        value = int(_TX_APPLIED.unpack_from(self._mem, 0)[0])
        return value & 0xFFFF if value & 0x80000000 else None

    def read(self, index: int) -> Record | None:
        """The record at `index` (None when free or unreadable)."""
        best: Record | None = None
        best_gen = -1
        for copy in (0, 1):
            base = self._copy_base(index, copy)
            generation, crc, intent = _COPY_HEADER.unpack_from(self._mem, base)
            if generation == 0 or intent not in (NO_INTENT, RX_INTENT, TX_INTENT):
                continue
            body = bytes(self._mem[base + _COPY_HEADER.size : base + _PAYLOAD_OFFSET + 2 * STATE.size])
            if zlib.crc32(struct.pack("<QI", generation, intent) + body) != crc or generation <= best_gen:
                continue
            (arg,) = _INTENT_ARG.unpack_from(body, 0)
            pre = STATE.unpack_from(body, _INTENT_ARG.size)
            post = STATE.unpack_from(body, _INTENT_ARG.size + STATE.size)
            best, best_gen = Record(tuple(pre), tuple(post), int(intent), int(arg)), generation
        if best is None or not (best.post[0] or best.pre[0]):
            return None
        return best

    def records(self) -> dict[int, Record]:
        return {i: r for i in range(MAX_RECORDS) if (r := self.read(i)) is not None}

    def clear(self) -> None:
        """Forget every record (a device reset)."""
        for index in range(MAX_RECORDS):
            if self.read(index) is not None:
                self.release(index)
        self._free = list(range(MAX_RECORDS - 1, -1, -1))
        _TX_APPLIED.pack_into(self._mem, 0, 0)

    # --- layout -------------------------------------------------------------------------
    def _copy_base(self, index: int, copy: int) -> int:
        return HEADER_BYTES + index * RECORD_BYTES + copy * COPY_BYTES

    def _generation(self, index: int, copy: int) -> int:
        return int(_COPY_HEADER.unpack_from(self._mem, self._copy_base(index, copy))[0])

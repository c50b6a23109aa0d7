"""One vsock stream between a guest port and a host AF_UNIX stream: state and credit.

A connection is keyed by (local_port, peer_port): local is the host side's port (the
port a guest connected to, or one we picked for a host-initiated connection), peer the
guest's. It owns the host socket and knows nothing of virtqueues: the muxer hands it the
guest's packets (`on_*`) and asks it for the next packet to the guest (`next_rx`).

Credit (spec 5.10.6.3), both directions, counters wrapping at 2^32:

* guest -> host: we advertise `buf_alloc` (TX_BUF_SIZE) and `fwd_cnt` (bytes written to
  the host socket). Bytes the host socket does not take at once wait in `tx_buf`; a
  guest that sends more than its credit (tx_buf would grow past buf_alloc) is reset, so
  nothing the guest does makes this buffer grow without bound. All connections' tx_bufs
  together draw on one `TxBudget` (the muxer's): credit times the connection limit would
  be 256 MiB, so a connection whose buffer would take the total past the budget is reset
  too (only when host readers are stuck on many connections at once). A CREDIT_UPDATE goes out
  when CREDIT_UPDATE_THRESHOLD forwarded bytes were not yet announced (every packet we
  send announces fwd_cnt), or when the guest asks (CREDIT_REQUEST).
* host -> guest: the guest advertises its buf_alloc and fwd_cnt in every packet; we read
  from the host socket only as much as `peer_credit()` allows, straight into the guest's
  rx buffer. Out of credit, we stop reading (the host writer blocks: its socket buffer is
  the only buffer) and send one CREDIT_REQUEST.

Closing (half-close both ways):

* guest SHUTDOWN(SEND): once tx_buf is flushed, shutdown(SHUT_WR) the host socket (the
  host reads EOF and can still write);
* guest SHUTDOWN(RCV): stop reading the host socket;
* guest SHUTDOWN(both) (its close()): flush, close the host socket, RST to the guest;
* host EOF (its shutdown(SHUT_WR)): SHUTDOWN(SEND) to the guest;
* host gone (EPOLLHUP, or a write fails): SHUTDOWN(both) to the guest, which answers RST
  (or we reset it after SHUTDOWN_TIMEOUT_S);
* both directions finished by half-closes: RST to the guest, host socket closed;
* guest RST: host socket closed, connection forgotten.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable, Sequence
from enum import Enum

from devices.vsock.packet import (
    HEADER_SIZE,
    HOST_CID,
    MAX_PKT_BUF_SIZE,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Op,
    header_bytes,
)
from shared.virtio.chain import DescriptorChain

TX_BUF_SIZE = 256 * 1024  # our buf_alloc: what a guest may have in flight towards the host
CREDIT_UPDATE_THRESHOLD = TX_BUF_SIZE // 4
TX_BUFFER_BUDGET = 32 * 1024 * 1024  # all connections' tx_bufs together (one muxer)
SHUTDOWN_TIMEOUT_S = 2.0  # SHUTDOWN(both) sent, the guest's RST awaited (Firecracker's value)
TX_HOLD_MAX_S = 1.0  # how long a guest chain may wait for a host socket that takes nothing
REQUEST_TIMEOUT_S = 5.0  # REQUEST sent for a host-initiated connection, RESPONSE awaited
_U32 = 0xFFFFFFFF
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_RESET_ERRORS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)

EPOLLIN, EPOLLOUT = 0x001, 0x004


class State(Enum):
    LOCAL_INIT = "local_init"  # host-initiated: REQUEST to the guest, RESPONSE awaited
    ESTABLISHED = "established"
    CLOSING = "closing"  # SHUTDOWN(both) to the guest, its RST awaited
    DEAD = "dead"  # RST to be sent (or sent): the muxer forgets the connection


class CreditViolation(Exception):
    """The guest sent more than the credit we gave it."""


class TxBudgetExceeded(Exception):
    """Buffering the guest's bytes would take all connections' tx_bufs past their budget."""


class TxBudget:
    """Bytes waiting in the tx_buf of every connection of one muxer, against `limit`."""

    def __init__(self, limit: int = TX_BUFFER_BUDGET) -> None:
        self.limit = limit
        self.used = 0


def _drop_front(views: Sequence[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for view in views:
        if n >= len(view):
            n -= len(view)
            continue
        out.append(view[n:])
        n = 0
    return out


_BITS = (
    "guest_shut_send",
    "guest_shut_recv",
    "host_eof",
    "host_hup",
    "host_shut_wr",
    "need_request",
    "need_response",
    "need_credit_update",
    "need_credit_request",
    "need_rst",
    "credit_stalled",
    "host_readable",
)
_STATES = tuple(State)
_SCRATCH = bytearray(MAX_PKT_BUF_SIZE)  # where peeked bytes are consumed to


class Connection:
    """A vsock stream. `counters` is the device's metrics dict (shared, incremented here)."""

    def __init__(
        self,
        sock: socket.socket,
        guest_cid: int,
        local_port: int,
        peer_port: int,
        state: State,
        counters: dict[str, int],
        *,
        peer_buf_alloc: int = 0,
        peer_fwd_cnt: int = 0,
        buf_alloc: int = TX_BUF_SIZE,
        clock: Callable[[], float] = time.monotonic,
        budget: TxBudget | None = None,
    ) -> None:
        self.sock = sock
        self.guest_cid = guest_cid
        self.local_port = local_port
        self.peer_port = peer_port
        self.state = state
        self.counters = counters
        self.clock = clock
        self.buf_alloc = buf_alloc
        # guest -> host
        self.tx_buf = bytearray()
        self.budget = budget if budget is not None else TxBudget()
        self.host_prefix = b""  # "OK <port>\n", written before any guest byte
        self.tx_recv_cnt = 0  # guest payload bytes accepted
        self.fwd_cnt = 0  # ... of which written to the host socket
        self.last_fwd_cnt_sent = 0
        # host -> guest
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt
        self.rx_cnt = 0  # payload bytes sent to the guest
        self.host_readable = False
        self.credit_stalled = False
        # closing
        self.guest_shut_send = False
        self.guest_shut_recv = False
        self.host_eof = False
        self.host_hup = False
        self.host_shut_wr = False
        # packets owed to the guest (each at most once: bounded by construction)
        self.need_request = state is State.LOCAL_INIT
        self.need_response = False
        self.need_credit_update = False
        self.need_credit_request = False
        self.shutdown_flags = 0  # SHUTDOWN owed with these flags
        self.need_rst = False
        self.deadline: float | None = clock() + REQUEST_TIMEOUT_S if state is State.LOCAL_INIT else None
        self.in_ready = False  # on the muxer's round-robin list
        self.interest = 0  # epoll events the muxer has registered for the host socket
        # durability (devices.vsock.durable): the supervisor's id of the host socket (0: it
        # keeps no copy, the connection cannot survive the worker), the table record
        self.sock_id = 0
        self.slot: int | None = None
        self.tx_pos = 0xFFFFFFFF  # avail position of the last RW packet applied
        self.peeked = 0  # bytes read with MSG_PEEK into the rx packet not yet published
        self.tx_held: tuple[int, int, float] | None = None  # (avail position, bytes sent, since)
        self.sent_hook: Callable[[], None] | None = None  # records the connection after a send

    # --- the durable record ----------------------------------------------------------------
    def record(self) -> tuple[int, ...]:
        """The fields of `devices.vsock.durable.FIELDS`, in order."""
        bits = sum(1 << i for i, name in enumerate(_BITS) if getattr(self, name))
        return (
            1,
            self.sock_id,
            self.local_port,
            self.peer_port,
            _STATES.index(self.state),
            bits,
            self.shutdown_flags,
            self.buf_alloc,
            self.tx_recv_cnt,
            self.fwd_cnt,
            self.last_fwd_cnt_sent,
            self.peer_buf_alloc,
            self.peer_fwd_cnt,
            self.rx_cnt,
            len(self.tx_buf),
            len(self.host_prefix),
            self.tx_pos,
            self.tx_held[0] if self.tx_held is not None else 0xFFFFFFFF,
            self.tx_held[1] if self.tx_held is not None else 0,
        )

    def load_record(self, fields: tuple[int, ...]) -> None:
        """Take a recorded connection's state (a replacement worker, `UnixMuxer.resume`)."""
        (_, self.sock_id, _, _, state, bits, self.shutdown_flags, self.buf_alloc) = fields[:8]
        (self.tx_recv_cnt, self.fwd_cnt, self.last_fwd_cnt_sent, self.peer_buf_alloc) = fields[8:12]
        (self.peer_fwd_cnt, self.rx_cnt, _tx_buf_len, prefix_len, self.tx_pos, held_pos, held_sent) = fields[12:19]
        self.tx_held = (held_pos, held_sent, self.clock()) if held_pos != 0xFFFFFFFF else None
        self.state = _STATES[state] if state < len(_STATES) else State.DEAD
        for i, name in enumerate(_BITS):
            setattr(self, name, bool(bits & (1 << i)))
        prefix = f"OK {self.local_port}\n".encode()
        self.host_prefix = prefix[len(prefix) - prefix_len :] if 0 < prefix_len <= len(prefix) else b""
        self.deadline = None
        if self.state is State.LOCAL_INIT:
            self.deadline = self.clock() + REQUEST_TIMEOUT_S
        elif self.state is State.CLOSING:
            self.deadline = self.clock() + SHUTDOWN_TIMEOUT_S
        self.host_readable = self.host_readable or self.state is State.ESTABLISHED  # look again

    def commit_rx(self) -> None:
        """The rx packet is published: consume the bytes it peeked from the host socket."""
        n, self.peeked = self.peeked, 0
        while n:
            try:
                got = self.sock.recv_into(_SCRATCH, min(n, len(_SCRATCH)), socket.MSG_DONTWAIT)
            except OSError:
                self.counters["rx_read_fails"] += 1
                self._host_gone()
                return
            if got <= 0:
                return
            n -= got

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    # --- credit --------------------------------------------------------------------------
    def peer_credit(self) -> int:
        """Bytes the guest can take now."""
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    def update_peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc, self.peer_fwd_cnt = buf_alloc, fwd_cnt
        if self.peer_credit() > 0:
            self.credit_stalled = False

    # --- what the host socket should be polled for ------------------------------------------
    def wanted_events(self) -> int:
        if self.state is State.DEAD:
            return 0
        events = 0
        if self.state is State.ESTABLISHED and not (self.host_readable or self.host_eof or self.guest_shut_recv):
            events |= EPOLLIN
        if self.host_prefix or self.tx_buf or self.tx_held:
            events |= EPOLLOUT
        return events

    # --- packets from the guest -------------------------------------------------------------
    def on_response(self) -> None:
        if self.state is not State.LOCAL_INIT:
            self.kill()
            return
        self.state = State.ESTABLISHED
        self.deadline = None
        self.host_prefix = f"OK {self.local_port}\n".encode()
        self.flush()

    def on_rw(self, payload: Sequence[memoryview], position: int = -1, hold: bool = False) -> bool:
        """Guest data for the host; CreditViolation if it overran its credit.

        With `hold` (a durable connection), bytes the host socket does not take now stay in
        the guest's chain (at avail `position`) instead of going to `tx_buf`: True means the
        chain must not be completed yet; it is offered again once the socket is writable,
        and the bytes sent so far (`tx_held`) are skipped then. A hold older than
        TX_HOLD_MAX_S falls back to `tx_buf` (such bytes do not survive the worker)."""
        if self.state is State.CLOSING:
            self.tx_held = None
            return False  # the host is gone; the guest was told (SHUTDOWN both)
        if self.state is not State.ESTABLISHED or self.guest_shut_send:
            self.tx_held = None
            self.kill()
            return False
        n = sum(len(v) for v in payload)
        if not n:
            return False
        held = self.tx_held if self.tx_held is not None and self.tx_held[0] == position else None
        if held is None:
            in_flight = (self.tx_recv_cnt + n - self.fwd_cnt) & _U32
            if in_flight > self.buf_alloc:
                raise CreditViolation(
                    f"port {self.peer_port}->{self.local_port}: {in_flight} bytes in flight, buf_alloc {self.buf_alloc}"
                )
        if hold and not self.tx_buf and not self.host_prefix:
            sent = held[1] if held is not None else 0
            since = held[2] if held is not None else self.clock()
            if self.clock() - since <= TX_HOLD_MAX_S:
                written = self._send(_drop_front(payload, sent))
                if written is None:
                    self.tx_held = None
                    return False
                self.tx_recv_cnt = (self.tx_recv_cnt + written) & _U32
                self._forwarded(written)
                if sent + written < n:
                    self.tx_held = (position, sent + written, since)
                else:
                    self.tx_held, self.tx_pos = None, position
                if self.sent_hook is not None:
                    self.sent_hook()  # the record, at once: the window in doubt is this short
                self.counters["tx_bytes_count"] += written
                self._check_credit_update()
                return self.tx_held is not None
            payload = _drop_front(payload, sent)  # held too long: the rest waits in tx_buf
            n -= sent
        self.tx_held = None
        self.tx_recv_cnt = (self.tx_recv_cnt + n) & _U32
        self.counters["tx_bytes_count"] += n
        if not self.tx_buf and not self.host_prefix:
            written = self._send(payload)
            if written is None:
                return False
            self._forwarded(written)
            payload = _drop_front(payload, written)
        left = sum(len(v) for v in payload)
        if left and self.budget.used + left > self.budget.limit:
            raise TxBudgetExceeded(f"port {self.peer_port}->{self.local_port}: {left} more bytes to buffer")
        for view in payload:
            self.tx_buf += view
        self.budget.used += left
        self._check_credit_update()
        return False

    def on_shutdown(self, flags: int) -> None:
        if self.state is State.CLOSING and flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH:
            self.kill()  # the host is gone and the guest closed too: confirm with RST
            return
        if flags & SHUTDOWN_SEND:
            self.guest_shut_send = True
        if flags & SHUTDOWN_RCV:
            self.guest_shut_recv = True
            self.host_readable = False
        self._maybe_finish()

    def on_credit_request(self) -> None:
        self.need_credit_update = True

    # --- the host socket ---------------------------------------------------------------------
    def on_host_events(self, events: int, hup: bool) -> None:
        if hup:
            self.host_hup = True
        if events & EPOLLIN or hup:
            self.host_readable = True
            if self.peer_credit() == 0 and self.state is State.ESTABLISHED and not self.credit_stalled:
                self.credit_stalled = True
                self.need_credit_request = True
        if events & EPOLLOUT:
            self.flush()

    def _send(self, data: Sequence[memoryview] | bytes) -> int | None:
        """Write to the host socket: bytes written (0 if it would block), None if the host is gone."""
        try:
            if isinstance(data, bytes | bytearray):
                return self.sock.send(data, _SEND_FLAGS)
            return self.sock.sendmsg(data, (), _SEND_FLAGS)
        except BlockingIOError:
            return 0
        except OSError:
            self.counters["tx_write_fails"] += 1
            self._host_gone()
            return None

    def flush(self) -> None:
        """Write buffered bytes to the host socket, as much as it takes."""
        if self.host_prefix:
            written = self._send(self.host_prefix)
            if written is None:
                return
            self.host_prefix = self.host_prefix[written:]
            if self.host_prefix:
                return
        while self.tx_buf:
            written = self._send(bytes(self.tx_buf[: MAX_PKT_BUF_SIZE * 4]))
            if written is None:
                self.counters["tx_flush_fails"] += 1
                return
            if written == 0:
                break
            del self.tx_buf[:written]
            self.budget.used -= written
            self._forwarded(written)
        self._check_credit_update()
        self._maybe_finish()

    def _forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & _U32

    def _check_credit_update(self) -> None:
        if ((self.fwd_cnt - self.last_fwd_cnt_sent) & _U32) >= CREDIT_UPDATE_THRESHOLD:
            self.need_credit_update = True

    def release_tx_buf(self) -> None:
        """Forget the bytes waiting for the host (and give them back to the budget)."""
        self.budget.used -= len(self.tx_buf)
        self.tx_buf.clear()

    def _host_gone(self) -> None:
        """The host closed its socket: tell the guest, wait for its RST."""
        self.release_tx_buf()
        self.host_prefix = b""
        self.host_readable = False
        if self.state is State.ESTABLISHED:
            self.state = State.CLOSING
            self.shutdown_flags = SHUTDOWN_BOTH
            self.deadline = self.clock() + SHUTDOWN_TIMEOUT_S
        elif self.state is State.LOCAL_INIT:
            self.kill()

    def _maybe_finish(self) -> None:
        if self.state is not State.ESTABLISHED or self.tx_buf or self.host_prefix:
            return
        if self.guest_shut_send and self.guest_shut_recv:
            self.kill()  # the guest closed: host socket closed, RST to confirm
            return
        if self.guest_shut_send and not self.host_shut_wr:
            self.host_shut_wr = True
            with contextlib.suppress(OSError):  # the host may be gone already
                self.sock.shutdown(socket.SHUT_WR)
        if self.guest_shut_send and self.host_eof:
            self.kill()  # both directions half-closed: done

    def kill(self) -> None:
        """Send RST to the guest and forget the connection (the muxer closes the socket)."""
        if self.state is not State.DEAD:
            self.state = State.DEAD
            self.need_rst = True
            self.deadline = None
            self.release_tx_buf()
            self.host_prefix = b""
            self.counters["conns_killed"] += 1

    def on_timeout(self) -> None:
        if self.deadline is not None and self.clock() >= self.deadline:
            self.kill()

    # --- packets to the guest -------------------------------------------------------------------
    def has_pending_rx(self) -> bool:
        if self.need_rst or self.need_request or self.need_response or self.shutdown_flags:
            return True
        if self.need_credit_update or self.need_credit_request:
            return True
        return self._can_read()

    def _can_read(self) -> bool:
        return (
            self.state is State.ESTABLISHED
            and self.host_readable
            and not self.guest_shut_recv
            and not self.host_eof
            and self.peer_credit() > 0
        )

    def _header(self, op: Op, length: int = 0, flags: int = 0) -> bytes:
        self.last_fwd_cnt_sent = self.fwd_cnt  # every packet announces fwd_cnt
        self.need_credit_update = False
        return header_bytes(
            HOST_CID,
            self.guest_cid,
            self.local_port,
            self.peer_port,
            op,
            length=length,
            flags=flags,
            buf_alloc=self.buf_alloc,
            fwd_cnt=self.fwd_cnt,
        )

    def next_rx(self, chain: DescriptorChain) -> int | None:
        """Write the next packet for the guest into `chain`; its length, or None if none is due.

        `chain` has room for at least a header (the device checked)."""
        steady = not (self.need_request or self.need_rst or self.need_response)
        if steady and chain.writable_len > HEADER_SIZE and self._can_read():  # the data path
            written = self._read_into(chain)
            if written is not None:
                return written  # else nothing could be read: _can_read() is False now
        writer = chain.writer()
        if self.need_request:
            self.need_request = False
            writer.write(self._header(Op.REQUEST))
            return HEADER_SIZE
        if self.need_rst and not self.shutdown_flags:
            self.need_rst = False
            writer.write(self._header(Op.RST))
            return HEADER_SIZE
        if self.need_response:
            self.need_response = False
            writer.write(self._header(Op.RESPONSE))
            return HEADER_SIZE
        if self._can_read() and chain.writable_len <= HEADER_SIZE:
            # no room for data in this buffer: use it for a credit update, so that the
            # buffers queued behind it (which may be larger) are reached
            writer.write(self._header(Op.CREDIT_UPDATE))
            return HEADER_SIZE
        if self._can_read():
            written = self._read_into(chain)
            if written is not None:
                return written
        if self.shutdown_flags:
            flags, self.shutdown_flags = self.shutdown_flags, 0
            writer.write(self._header(Op.SHUTDOWN, flags=flags))
            return HEADER_SIZE
        if self.need_credit_request:
            self.need_credit_request = False
            writer.write(self._header(Op.CREDIT_REQUEST))
            return HEADER_SIZE
        if self.need_credit_update:
            writer.write(self._header(Op.CREDIT_UPDATE))
            return HEADER_SIZE
        return None

    def _read_into(self, chain: DescriptorChain) -> int | None:
        """One RW packet read from the host socket into `chain`, or None (nothing to read / EOF)."""
        writer = chain.writer()
        header_views = writer.views(HEADER_SIZE)
        room = min(writer.remaining, self.peer_credit(), MAX_PKT_BUF_SIZE)
        if room <= 0:
            return None
        try:  # peeked: consumed once the packet is published (commit_rx), so a crash loses nothing
            n = self.sock.recvmsg_into(writer.views(room), 0, socket.MSG_DONTWAIT | socket.MSG_PEEK)[0]
        except BlockingIOError:
            self.host_readable = False
            return None
        except OSError:
            self.counters["rx_read_fails"] += 1
            self._host_gone()
            return None
        if n == 0:
            self._host_eof()
            return None
        header = self._header(Op.RW, length=n)
        pos = 0
        for view in header_views:
            view[:] = header[pos : pos + len(view)]
            pos += len(view)
        self.rx_cnt = (self.rx_cnt + n) & _U32
        self.peeked = n
        self.counters["rx_bytes_count"] += n
        if self.peer_credit() == 0 and not self.credit_stalled:  # the host may have more: ask
            self.credit_stalled = True
            self.need_credit_request = True
        return HEADER_SIZE + n

    def _host_eof(self) -> None:
        self.host_eof = True
        self.host_readable = False
        if self.host_hup and not self.host_shut_wr:  # after our own SHUT_WR, HUP is just their SHUT_WR
            self._host_gone()
            return
        self.shutdown_flags |= SHUTDOWN_SEND
        if self.guest_shut_send and not self.tx_buf:
            self.kill()  # the SHUTDOWN goes first, then the RST

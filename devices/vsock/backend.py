"""The host side of the vsock device: the `VsockBackend` interface and the AF_UNIX muxer.

The device knows only its queues and a backend (Firecracker's VsockBackend/VsockChannel
split): it gives the backend every packet the guest sends (`send_pkt`) and asks it for
packets to put in rx buffers (`recv_pkt`). The backend is one pollable fd for the worker's
loop (`fileno`, then `notify()` when it is readable) plus timers (`next_timeout`,
`on_timer`).

`UnixMuxer` implements Firecracker's hybrid vsock over Unix sockets:

* host-initiated: a host process connects to the listening socket at `uds_path` (created
  by the supervisor, handed over as an fd), writes `CONNECT <port>\\n`; the muxer sends
  REQUEST to the guest, and on RESPONSE writes `OK <host_port>\\n` back and starts
  forwarding; a guest RST (nobody listening) closes the host socket;
* guest-initiated: a REQUEST to host port P needs a connection to `<uds_path>_P`. In the
  worker the supervisor makes it (`connector`: the worker has no filesystem and may not
  create sockets) and hands back the connected socket, or says it was refused
  (`guest_connected`); at most MAX_GUEST_CONNECTING wait for that, each at most
  GUEST_CONNECT_TIMEOUT_S. Without a connector (tests) the muxer connects itself
  (non-blocking: an AF_UNIX connect completes at once or fails). RESPONSE on success,
  RST when nobody listens.

Many connections, no head-of-line blocking: the host sockets sit in the muxer's own epoll
(nested in the worker's loop), connections with something for the guest wait on a
round-robin list, and each `recv_pkt` serves one packet of one connection. RSTs for
packets that belong to no connection wait on a bounded queue (overflow: dropped and
counted); `rx_backlogged()` tells the device to stop taking tx packets until the guest
gives rx buffers again, so a guest that never reads cannot make the worker queue work.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Protocol

from devices.vsock.connection import (
    EPOLLIN,
    TX_BUFFER_BUDGET,
    TX_HOLD_MAX_S,
    Connection,
    CreditViolation,
    State,
    TxBudget,
    TxBudgetExceeded,
)
from devices.vsock.durable import RX_INTENT, TX_INTENT, ConnTable, Record
from devices.vsock.packet import HEADER_SIZE, HOST_CID, TYPE_STREAM, Op, TxPacket, header_bytes
from shared.ratelimited_log import RateLimitedLog
from shared.virtio.chain import DescriptorChain

log = logging.getLogger(__name__)
_glog = RateLimitedLog(log)

MAX_CONNECTIONS = 1023  # Firecracker's defs::MAX_CONNECTIONS
MAX_PENDING_RST = 256  # RSTs for packets of no connection, waiting for rx buffers
CONNECT_LINE_MAX = 32  # "CONNECT 4294967295\n" is 19 bytes
CONNECT_TIMEOUT_S = 2.0  # a host connection must send its CONNECT line within this
MAX_GUEST_CONNECTING = 64  # guest REQUESTs waiting for the supervisor's connect at once
GUEST_CONNECT_TIMEOUT_S = 2.0  # ... each for at most this long (then RST)

# Asks for a connection to <uds_path>_<host_port> for the guest's port; the answer comes
# back through UnixMuxer.guest_connected.
Connector = Callable[[int, int], None]
MAX_ACCEPTS_PER_TURN = 64
LOCAL_PORT_FIRST = 1 << 30  # host-initiated connections get ports from here (as Firecracker)
MAX_UDS_PATH = 107  # sun_path holds 108 bytes with the NUL

_LISTENER = -1

COUNTER_NAMES = (
    "conns_added",
    "conns_killed",
    "conns_removed",
    "conn_event_fails",
    "muxer_event_fails",
    "killq_resync",
    "tx_flush_fails",
    "tx_write_fails",
    "rx_read_fails",
    "rx_bytes_count",
    "tx_bytes_count",
    # ours, beside Firecracker's
    "host_connects",
    "host_connect_bad_lines",
    "host_connect_refused",
    "guest_connects",
    "guest_connect_refused",
    "credit_violations",
    "unknown_conn_packets",
    "unknown_op_packets",
    "bad_type_packets",
    "rst_dropped",
    "tx_budget_resets",
)


class VsockBackend(Protocol):
    """What the device needs from the host side."""

    def send_pkt(self, pkt: TxPacket, position: int = -1) -> bool:
        """A packet from the guest (already checked: header well-formed, CIDs right), from
        the tx chain at avail `position`. True: the chain is held (not to be completed; it
        is offered again later, devices.vsock.connection.Connection.on_rw)."""

    def tx_applied(self, position: int) -> None:
        """The tx chain at avail `position` was applied (before its used entry is published)."""

    def recv_pkt(self, chain: DescriptorChain, used_index: int = -1) -> int | None:
        """Write the next packet for the guest into `chain`, whose used entry will go to
        `used_index`; its length, or None if none."""

    def rx_published(self) -> None:
        """The packet `recv_pkt` returned is published in the used ring."""

    def has_pending_rx(self) -> bool:
        """Whether `recv_pkt` may have something."""

    def rx_backlogged(self) -> bool:
        """Too many packets wait for rx buffers: take no more tx packets for now."""

    def fileno(self) -> int:
        """The fd to poll; call `notify()` when it is readable."""

    def notify(self) -> None:
        """Handle whatever happened on the host side."""

    def next_timeout(self) -> float | None:
        """Seconds until `on_timer` is due, or None."""

    def on_timer(self) -> None:
        """Expire connection deadlines."""

    def reset(self) -> None:
        """Drop every connection (device reset, transport reset)."""


def _nonblocking_stream(sock: socket.socket) -> bool:
    """A connected stream socket whose file is already O_NONBLOCK, as the supervisor makes
    them (making it so here would take ioctl(FIONBIO), which the worker may not call)."""
    return sock.type == socket.SOCK_STREAM and bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


class _GuestConnecting:
    """A guest REQUEST waiting for its host connection: the guest's credit, a deadline."""

    def __init__(self, buf_alloc: int, fwd_cnt: int, deadline: float) -> None:
        self.buf_alloc = buf_alloc
        self.fwd_cnt = fwd_cnt
        self.deadline = deadline


class _Pending:
    """An accepted host connection whose CONNECT line has not arrived yet."""

    def __init__(self, sock: socket.socket, deadline: float, sock_id: int = 0) -> None:
        self.sock = sock
        self.deadline = deadline
        self.sock_id = sock_id  # the supervisor's copy (0: none)
        self.line = bytearray()


def parse_connect_line(line: bytes) -> int | None:
    """The port of `CONNECT <port>` (without the newline), or None if malformed."""
    parts = line.split(b" ")
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit() or len(parts[1]) > 10:
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None


class UnixMuxer:
    """Firecracker's vsock-over-AF_UNIX backend for the guest with CID `guest_cid`."""

    def __init__(
        self,
        guest_cid: int,
        uds_path: str,
        listener: socket.socket | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = MAX_CONNECTIONS,
        tx_buffer_budget: int = TX_BUFFER_BUDGET,
        connector: Connector | None = None,
        table: ConnTable | None = None,
        release: Callable[[int], None] | None = None,
    ) -> None:
        if len(f"{uds_path}_4294967295".encode()) > MAX_UDS_PATH:
            raise ValueError(f"uds_path {uds_path!r} is too long for <uds_path>_<port> to fit a Unix socket address")
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.listener = listener
        self.clock = clock
        self.max_connections = max_connections
        self.tx_budget = TxBudget(tx_buffer_budget)  # shared by every connection's tx_buf
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.epoll = select.epoll()
        self.conns: dict[tuple[int, int], Connection] = {}
        self._by_fd: dict[int, Connection] = {}
        self.pending: dict[int, _Pending] = {}
        self.connector = connector
        self.guest_connecting: dict[tuple[int, int], _GuestConnecting] = {}
        self.ready: collections.deque[Connection] = collections.deque()
        self.rst_queue: collections.deque[tuple[int, int]] = collections.deque()
        self._local_port_last = LOCAL_PORT_FIRST - 1
        self.table = table  # the durable connection table (devices.vsock.durable), if any
        self.release = release  # tells the supervisor it may close its copy of a host socket
        self._rx_conn: Connection | None = None  # whose packet recv_pkt returned, until published
        if listener is not None:
            self.epoll.register(listener.fileno(), EPOLLIN)

    # --- the worker's loop ------------------------------------------------------------------
    def fileno(self) -> int:
        return self.epoll.fileno()

    def notify(self) -> None:
        try:
            events = self.epoll.poll(0, 256)
        except OSError as e:
            self.counters["muxer_event_fails"] += 1
            _glog.error("vsock muxer: epoll failed: %s", e)
            return
        for fd, mask in events:
            if self.listener is not None and fd == self.listener.fileno():
                self._accept()
            elif fd in self.pending:
                self._read_connect_line(self.pending[fd])
            elif fd in self._by_fd:
                conn = self._by_fd[fd]
                conn.on_host_events(mask, bool(mask & (select.EPOLLHUP | select.EPOLLERR)))
                self._after(conn)
            else:
                self.counters["conn_event_fails"] += 1

    def next_timeout(self) -> float | None:
        deadlines = [p.deadline for p in self.pending.values()]
        deadlines += [g.deadline for g in self.guest_connecting.values()]
        deadlines += [c.deadline for c in self.conns.values() if c.deadline is not None]
        deadlines += [c.tx_held[2] + TX_HOLD_MAX_S for c in self.conns.values() if c.tx_held is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock())

    def on_timer(self) -> None:
        now = self.clock()
        for fd, pending in list(self.pending.items()):
            if now >= pending.deadline:
                self.counters["host_connect_bad_lines"] += 1
                self._drop_pending(fd)
        for key, waiting in list(self.guest_connecting.items()):
            if now >= waiting.deadline:  # the supervisor never answered: the guest is told no
                del self.guest_connecting[key]
                self.counters["guest_connect_refused"] += 1
                self._enqueue_rst(key)
        for conn in list(self.conns.values()):
            if conn.deadline is not None and now >= conn.deadline:
                conn.on_timeout()
                self._after(conn)

    # --- host-initiated connections ----------------------------------------------------------
    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(MAX_ACCEPTS_PER_TURN):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                self.counters["muxer_event_fails"] += 1
                _glog.warning("vsock: accept on %s failed: %s", self.uds_path, e)
                return
            if len(self.conns) + len(self.pending) >= self.max_connections:
                self.counters["host_connect_refused"] += 1
                sock.close()
                continue
            self.pending[sock.fileno()] = _Pending(sock, self.clock() + CONNECT_TIMEOUT_S)
            self.epoll.register(sock.fileno(), EPOLLIN)

    def _drop_pending(self, fd: int) -> None:
        pending = self.pending.pop(fd)
        with contextlib.suppress(OSError):
            self.epoll.unregister(fd)
        pending.sock.close()
        self._release(pending.sock_id)

    def adopt_accepted(self, sock: socket.socket, sock_id: int) -> None:
        """A host connection the supervisor accepted at uds_path (it keeps a copy under
        `sock_id`): wait for its CONNECT line, as for one accepted here."""
        if not _nonblocking_stream(sock) or len(self.conns) + len(self.pending) >= self.max_connections:
            self.counters["host_connect_refused"] += 1
            sock.close()
            self._release(sock_id)
            return
        self.pending[sock.fileno()] = _Pending(sock, self.clock() + CONNECT_TIMEOUT_S, sock_id)
        self.epoll.register(sock.fileno(), EPOLLIN)

    def _read_connect_line(self, pending: _Pending) -> None:
        """Read the CONNECT line a byte at a time: nothing past its newline is taken (that is
        stream data), and no peek moves the socket's peek offset (devices.vsock.durable)."""
        fd = pending.sock.fileno()
        while len(pending.line) < CONNECT_LINE_MAX:
            try:
                byte = pending.sock.recv(1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self._drop_pending(fd)
                return
            if not byte:  # closed before its line ended
                self.counters["host_connect_bad_lines"] += 1
                self._drop_pending(fd)
                return
            if byte == b"\n":
                break
            pending.line += byte
        else:  # no line where one must be
            self.counters["host_connect_bad_lines"] += 1
            self._drop_pending(fd)
            return
        port = parse_connect_line(bytes(pending.line).rstrip(b"\r"))
        if port is None:
            self.counters["host_connect_bad_lines"] += 1
            self._drop_pending(fd)
            return
        del self.pending[fd]
        self.epoll.unregister(fd)
        local = self._new_local_port()
        conn = Connection(
            pending.sock,
            self.guest_cid,
            local,
            port,
            State.LOCAL_INIT,
            self.counters,
            clock=self.clock,
            budget=self.tx_budget,
        )
        conn.sock_id = pending.sock_id
        self.counters["host_connects"] += 1
        self._add(conn)

    def _new_local_port(self) -> int:
        while True:
            self._local_port_last += 1
            if self._local_port_last > 0x7FFFFFFF:
                self._local_port_last = LOCAL_PORT_FIRST
            if not any(k[0] == self._local_port_last for k in self.conns):
                return self._local_port_last

    # --- packets from the guest ---------------------------------------------------------------
    def send_pkt(self, pkt: TxPacket, position: int = -1) -> bool:
        h = pkt.header
        key = (h.dst_port, h.src_port)
        conn = self.conns.get(key)
        if h.type != TYPE_STREAM:
            self.counters["bad_type_packets"] += 1
            _glog.warning("vsock: guest sent a packet of type %d (only stream is supported)", h.type)
            if h.op != Op.RST:
                self._reset_or_rst(conn, key)
            return False
        if h.op not in (Op.REQUEST, Op.RESPONSE, Op.RST, Op.SHUTDOWN, Op.RW, Op.CREDIT_UPDATE, Op.CREDIT_REQUEST):
            self.counters["unknown_op_packets"] += 1
            _glog.warning("vsock: guest sent a packet with unknown op %d", h.op)
            self._reset_or_rst(conn, key)
            return False
        if conn is None:
            if key in self.guest_connecting:  # still connecting: anything but RST is a protocol error
                del self.guest_connecting[key]
                if h.op != Op.RST:
                    self.counters["guest_connect_refused"] += 1
                    self._enqueue_rst(key)
            elif h.op == Op.REQUEST:
                self._guest_connect(pkt)
            elif h.op != Op.RST:
                self.counters["unknown_conn_packets"] += 1
                self._enqueue_rst(key)
            return False
        if h.op == Op.RST:
            self._remove(conn)
            return False
        if conn.state is State.DEAD:
            return False  # its RST is on the way
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt)
        match h.op:
            case Op.REQUEST:
                conn.kill()  # a second REQUEST for a live connection
            case Op.RESPONSE:
                conn.on_response()
            case Op.SHUTDOWN:
                conn.on_shutdown(h.flags)
            case Op.RW:
                durable = self.table is not None and conn.slot is not None and conn.sock_id != 0 and position >= 0
                if durable:
                    # sendmsg and this record cannot change together: a replacement that
                    # finds the intent resets the connection (devices.vsock.durable)
                    self.table.write(conn.slot, conn.record(), TX_INTENT, position)  # type: ignore[union-attr, arg-type]
                    table, slot = self.table, conn.slot
                    conn.sent_hook = lambda: table.write(slot, conn.record())  # type: ignore[union-attr, arg-type]
                try:
                    if conn.on_rw(pkt.payload, position & 0xFFFF, hold=durable):
                        self._after(conn)
                        return True
                except CreditViolation as e:
                    self.counters["credit_violations"] += 1
                    _glog.warning("vsock: guest ignored its credit, connection reset: %s", str(e))
                    conn.kill()
                except TxBudgetExceeded as e:
                    self.counters["tx_budget_resets"] += 1
                    _glog.warning("vsock: host side too slow on too many connections, reset: %s", str(e))
                    conn.kill()
            case Op.CREDIT_REQUEST:
                conn.on_credit_request()
            case _:
                pass  # CREDIT_UPDATE: the header said it all
        self._after(conn)
        return False

    def _reset_or_rst(self, conn: Connection | None, key: tuple[int, int]) -> None:
        if conn is not None:
            conn.kill()
            self._after(conn)
        else:
            self._enqueue_rst(key)

    def _guest_connect(self, pkt: TxPacket) -> None:
        h = pkt.header
        key = (h.dst_port, h.src_port)
        self.counters["guest_connects"] += 1
        busy = len(self.conns) + len(self.pending) + len(self.guest_connecting) >= self.max_connections
        if busy or len(self.guest_connecting) >= MAX_GUEST_CONNECTING:
            self.counters["guest_connect_refused"] += 1
            self._enqueue_rst(key)
            return
        self.guest_connecting[key] = _GuestConnecting(h.buf_alloc, h.fwd_cnt, self.clock() + GUEST_CONNECT_TIMEOUT_S)
        if self.connector is not None:
            self.connector(h.dst_port, h.src_port)
        else:
            self.guest_connected(h.dst_port, h.src_port, self._connect_here(h.dst_port))

    def _connect_here(self, host_port: int) -> socket.socket | None:
        """Without a connector: connect to <uds_path>_<host_port> from this process."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"{self.uds_path}_{host_port}")
        except OSError as e:
            sock.close()
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                _glog.warning("vsock: connecting to %s_%d failed: %s", self.uds_path, host_port, e)
            return None
        return sock

    def guest_connected(self, host_port: int, guest_port: int, sock: socket.socket | None, sock_id: int = 0) -> bool:
        """The answer to a guest's REQUEST: the connected socket (RESPONSE), or None (RST).
        False, and `sock` closed, when no REQUEST waits for it any more (the guest reset it,
        it timed out, the device was reset) or it is no stream socket."""
        key = (host_port, guest_port)
        waiting = self.guest_connecting.pop(key, None)
        if waiting is None or (sock is not None and not _nonblocking_stream(sock)):
            if sock is not None:
                sock.close()
                self._release(sock_id)
            return False
        if sock is None:
            self.counters["guest_connect_refused"] += 1
            self._enqueue_rst(key)
            return True
        conn = Connection(
            sock,
            self.guest_cid,
            host_port,
            guest_port,
            State.ESTABLISHED,
            self.counters,
            peer_buf_alloc=waiting.buf_alloc,
            peer_fwd_cnt=waiting.fwd_cnt,
            clock=self.clock,
            budget=self.tx_budget,
        )
        conn.need_response = True
        conn.sock_id = sock_id
        self._add(conn)
        return True

    # --- connection bookkeeping -----------------------------------------------------------------
    def _add(self, conn: Connection) -> None:
        if self.table is not None:
            conn.slot = self.table.allocate()
        self.conns[conn.key] = conn
        self._by_fd[conn.sock.fileno()] = conn
        self.counters["conns_added"] += 1
        self._after(conn)

    def _remove(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is not conn:
            return
        del self.conns[conn.key]
        fd = conn.sock.fileno()
        self._by_fd.pop(fd, None)
        if conn.interest:
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)
            conn.interest = 0
        conn.sock.close()
        conn.release_tx_buf()
        conn.state = State.DEAD
        self.counters["conns_removed"] += 1
        if self.table is not None and conn.slot is not None:
            self.table.release(conn.slot)
            conn.slot = None
        if self._rx_conn is conn:
            self._rx_conn = None
        self._release(conn.sock_id)

    def _release(self, sock_id: int) -> None:
        if sock_id and self.release is not None:
            self.release(sock_id)

    def _after(self, conn: Connection) -> None:
        """Bring the epoll registration and the ready list in line with the connection."""
        if self.conns.get(conn.key) is not conn:
            return
        if conn.state is State.DEAD and not conn.need_rst and not conn.shutdown_flags:
            self._remove(conn)
            return
        wanted = conn.wanted_events()
        fd = conn.sock.fileno()
        if wanted != conn.interest:
            if not conn.interest:
                self.epoll.register(fd, wanted)
            elif not wanted:
                self.epoll.unregister(fd)  # even events=0 would report EPOLLHUP over and over
            else:
                self.epoll.modify(fd, wanted)
            conn.interest = wanted
        if not conn.in_ready and conn.has_pending_rx():
            conn.in_ready = True
            self.ready.append(conn)
        if self.table is not None and conn.slot is not None and conn is not self._rx_conn:
            self.table.write(conn.slot, conn.record())

    def _enqueue_rst(self, key: tuple[int, int]) -> None:
        if len(self.rst_queue) >= MAX_PENDING_RST:
            self.counters["rst_dropped"] += 1
            return
        self.rst_queue.append(key)

    # --- packets to the guest -------------------------------------------------------------------
    def has_pending_rx(self) -> bool:
        return bool(self.rst_queue or self.ready)

    def rx_backlogged(self) -> bool:
        return len(self.rst_queue) >= MAX_PENDING_RST // 2

    def recv_pkt(self, chain: DescriptorChain, used_index: int = -1) -> int | None:
        if self.rst_queue:
            local, peer = self.rst_queue.popleft()
            chain.writer().write(header_bytes(HOST_CID, self.guest_cid, local, peer, Op.RST))
            return HEADER_SIZE
        for _ in range(len(self.ready)):  # each connection at most once: one that cannot use
            conn = self.ready.popleft()  # this buffer (too small for data) goes back to the end
            conn.in_ready = False
            if self.conns.get(conn.key) is not conn:
                continue
            pre = conn.record()
            length = conn.next_rx(chain)
            if length is None:
                self._after(conn)  # back on the list (at the end) if it has more
                continue
            if self.table is not None and conn.slot is not None and used_index >= 0:
                # before the publish: which state holds depends on whether it happened
                self.table.write(conn.slot, conn.record(), RX_INTENT, used_index, pre=pre)
            self._rx_conn = conn
            return length
        return None

    def rx_published(self) -> None:
        conn, self._rx_conn = self._rx_conn, None
        if conn is None or self.conns.get(conn.key) is not conn:
            return
        conn.commit_rx()
        self._after(conn)  # records the state (no intent), back on the list if it has more

    def tx_applied(self, position: int) -> None:
        if self.table is not None and position >= 0:
            self.table.set_tx_applied(position)

    # --- a replacement worker -----------------------------------------------------------------
    def resume(
        self,
        records: dict[int, Record],
        sockets: dict[int, socket.socket],
        rx_used: int,
        accepted: frozenset[int] = frozenset(),
    ) -> int:
        """Rebuild the dead worker's connections from its table and the supervisor's copies
        of their host sockets (`sockets`, by id); `rx_used` is the rx queue's used index in
        guest memory; `accepted`: ids of host connections accepted by the supervisor (those
        not in the table wait for their CONNECT line again). A connection that cannot go on
        exactly (no host socket, guest bytes that may or may not have reached the host, guest
        bytes lost with the dead worker's buffer) gets RST, and its host socket is closed.
        Returns how many survived."""
        assert self.table is not None
        resumed = 0
        for index, record in records.items():
            published = record.intent == RX_INTENT and (rx_used & 0xFFFF) != (record.arg & 0xFFFF)
            fields = record.post if record.intent != RX_INTENT or published else record.pre
            sock_id, local, peer = fields[1], fields[2], fields[3]
            sock = sockets.pop(sock_id, None) if sock_id else None
            conn = None
            if sock is not None:
                conn = Connection(
                    sock,
                    self.guest_cid,
                    local,
                    peer,
                    State.DEAD,
                    self.counters,
                    clock=self.clock,
                    budget=self.tx_budget,
                )
                conn.load_record(fields)
                # always: a worker killed between its peek and the intent record peeked bytes
                # it never published (and no record says so)
                _settle_peek(sock, published)
            exact = record.intent != TX_INTENT and fields[14] == 0  # no send in doubt, no lost tx_buf
            if conn is None or not exact or conn.state is State.DEAD or (local, peer) in self.conns:
                _glog.warning(
                    "vsock: connection %d->%d reset at the worker restart: %s",
                    peer,
                    local,
                    "no host socket kept"
                    if conn is None
                    else f"guest bytes in doubt (intent {record.intent}, {fields[14]} bytes waited for the host)"
                    if not exact
                    else "it was closing",
                )
                if conn is not None:
                    conn.sock.close()
                self._release(sock_id)
                self.table.release(index)
                self._enqueue_rst((local, peer))
                self.counters["conns_killed"] += 1
                continue
            conn.slot = index
            conn.sock_id = sock_id
            self.conns[conn.key] = conn
            self._by_fd[conn.sock.fileno()] = conn
            if local > self._local_port_last and local < 0x80000000:
                self._local_port_last = local
            self._after(conn)
            resumed += 1
        for sock_id, sock in sockets.items():  # not in the table: nothing the guest knows
            if sock_id in accepted:  # a host connection whose CONNECT line may still come
                self.adopt_accepted(sock, sock_id)
                continue
            sock.close()
            self._release(sock_id)
        return resumed

    def skip_in_flight_tx(self, pkt: TxPacket, position: int) -> bool:
        """Whether the tx packet at avail `position` (popped by the dead worker, not
        completed) was applied already and must not be applied again."""
        if self.table is None:
            return False
        if self.table.tx_applied() == (position + 1) & 0xFFFF:
            return True
        h = pkt.header
        conn = self.conns.get((h.dst_port, h.src_port))
        return h.op == Op.RW and conn is not None and conn.tx_pos == position & 0xFFFF

    # --- reset ------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.guest_connecting.clear()  # answers still on their way are closed when they come
        for conn in list(self.conns.values()):
            self._remove(conn)
        for fd in list(self.pending):
            self._drop_pending(fd)
        self.ready.clear()
        self.rst_queue.clear()

    def close(self) -> None:
        self.reset()
        self.epoll.close()
        if self.listener is not None:
            self.listener.close()


SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)


def _settle_peek(sock: socket.socket, published: bool) -> None:
    """After a worker died with an rx packet of this connection in flight: consume the
    bytes a published packet peeked (the socket's peek offset says how many are left), or
    rewind the peek of one that was never published."""
    try:
        peeked = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        if peeked > 0 and published:
            while peeked > 0:
                got = sock.recv_into(bytearray(min(peeked, 65536)), min(peeked, 65536), socket.MSG_DONTWAIT)
                if got <= 0:
                    break
                peeked -= got
        elif peeked > 0:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    except OSError as e:
        _glog.warning("vsock: cannot settle a peeked rx packet: %s", e)


def guest_path(uds_path: str, port: int) -> str:
    """Where a guest connection to host port `port` goes."""
    return f"{uds_path}_{port}"


def listening_socket(uds_path: str) -> socket.socket:
    """The supervisor's side: bind and listen at `uds_path` (non-blocking, for the worker)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(uds_path)
        sock.listen(128)
        os.set_blocking(sock.fileno(), False)
    except OSError:
        sock.close()
        raise
    return sock

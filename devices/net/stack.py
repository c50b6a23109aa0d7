"""The MMDS network stack inside a net worker: ARP, IPv4 and a minimal TCP server on port 80.

The device hands it every frame the guest sends to the MMDS address (`is_mmds_frame`), and
delivers what it produces (`take_output`) to the guest's rx queue; none of it reaches the
TAP. TCP is the least a real guest stack needs: the handshake (MSS option only, no window
scaling, timestamps or SACK), in-order data (an out-of-order segment is dropped and answered
with a duplicate ACK, so the guest retransmits), a receive window bounded by the request
buffer, the guest's window honoured (with zero-window probes), retransmission of our own
segments on a doubling timer, FIN in both directions (half-close: a request followed by
the guest's FIN is still answered), RST both ways. HTTP/1.1 keep-alive and pipelining come
from `mmds.parse_request`. A request over `MAX_REQUEST_BYTES` resets the connection.

Bounded whatever the guest does: at most `MAX_CONNECTIONS` connections (a SYN beyond that
is reset), each with a request buffer of `MAX_REQUEST_BYTES` (our advertised window: it
closes as the buffer fills) and a send buffer of answers not yet acknowledged. Requests are
answered only while that send buffer holds less than `SEND_BUFFER_BYTES`: a guest that
pipelines requests and never opens its window (or never acknowledges) stops being read,
its window to us closes, and the zero-window probes end in a reset after `MAX_RETRIES`;
so a send buffer never holds more than `SEND_BUFFER_BYTES` plus one answer (an answer is
at most the MMDS snapshot, whose size the host bounds). No out-of-order segment is kept.
Frames for the guest wait in `output`, at most `MAX_OUTPUT_FRAMES` (more are dropped and
counted: TCP retransmits). Idle connections are dropped after `IDLE_TIMEOUT_S`.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from devices.net import packets as pk
from devices.net.mmds import MAX_REQUEST_BYTES, HttpError, MmdsService, parse_request, response

MMDS_MAC = bytes.fromhex("060123456701")  # Firecracker's
DEFAULT_IPV4 = bytes([169, 254, 169, 254])
HTTP_PORT = 80
MSS = 1460
MAX_CONNECTIONS = 30
MAX_OUTPUT_FRAMES = 256
SEND_BUFFER_BYTES = 64 * 1024  # unacknowledged answers per connection before requests wait
INITIAL_RTO_S = 0.2
MAX_RETRIES = 6
IDLE_TIMEOUT_S = 120.0
_M32 = 0xFFFFFFFF


def _after(a: int, b: int) -> bool:
    """Sequence number a is after b (mod 2^32)."""
    return 0 < ((a - b) & _M32) < 0x80000000


@dataclass
class Connection:
    guest_mac: bytes
    guest_ip: bytes
    guest_port: int
    iss: int
    rcv_nxt: int
    peer_mss: int = 536
    peer_window: int = 0
    established: bool = False
    snd_una: int = 0
    snd_nxt: int = 0
    unacked: bytearray = field(default_factory=bytearray)  # data from snd_una (SYN/FIN excluded)
    inbuf: bytearray = field(default_factory=bytearray)
    close_after: bool = False  # send FIN once the queued answers are out
    fin_sent: bool = False
    fin_acked: bool = False
    peer_fin: bool = False
    retries: int = 0
    rto: float = INITIAL_RTO_S
    deadline: float | None = None
    last_activity: float = 0.0

    @property
    def data_start(self) -> int:
        """Sequence number of `unacked[0]`."""
        return (self.snd_una + (0 if self.established else 1)) & _M32

    @property
    def sent_data(self) -> int:
        """Bytes of `unacked` already sent once."""
        sent = (self.snd_nxt - self.data_start) & _M32
        return min(sent - (1 if self.fin_sent else 0), len(self.unacked)) if sent < 0x80000000 else 0

    def window(self) -> int:
        return max(0, MAX_REQUEST_BYTES - len(self.inbuf))


class MmdsStack:
    """Frames in (from the guest), frames out (to the guest), for one MMDS address."""

    def __init__(
        self, service: MmdsService, ipv4: bytes = DEFAULT_IPV4, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.service = service
        self.ip = ipv4
        self.clock = clock
        self.conns: dict[tuple[bytes, int], Connection] = {}
        self.output: deque[bytes] = deque()
        self._rng = random.Random()  # seeded from os.urandom here, before the seccomp filter
        self._ident = 0
        self.metrics = dict.fromkeys(
            (
                "rx_count",
                "rx_bad_eth",
                "rx_accepted_unusual",
                "tx_frames",
                "tx_count",
                "tx_bytes",
                "tx_errors",
                "connections_created",
                "connections_destroyed",
                "connections_reset",
                "retransmissions",
                "send_buffer_full",
            ),
            0,
        )

    # --- classification ------------------------------------------------------------------

    def is_mmds_frame(self, frame: bytes | memoryview) -> bool:
        """Whether a guest frame (no virtio header) is for the MMDS: ARP for it, or IPv4 to it."""
        if len(frame) < pk.ETH_HEADER + 20:
            return False
        ethertype = (frame[12] << 8) | frame[13]
        if ethertype == pk.ETH_P_ARP:
            return len(frame) >= 42 and bytes(frame[38:42]) == self.ip
        if ethertype == pk.ETH_P_IP:
            return bytes(frame[30:34]) == self.ip
        return False

    # --- input -----------------------------------------------------------------------------

    def receive(self, frame: bytes) -> None:
        """One guest frame for the MMDS; answers go to `output`. Never raises on bad input."""
        self.metrics["rx_count"] += 1
        try:
            eth = pk.parse_ethernet(frame)
            if eth.ethertype == pk.ETH_P_ARP:
                self._arp(eth)
            elif eth.ethertype == pk.ETH_P_IP:
                self._ip(eth)
        except pk.PacketError:
            self.metrics["rx_bad_eth"] += 1

    def _arp(self, eth: pk.Ethernet) -> None:
        request = pk.parse_arp(eth.payload)
        if request.op != 1 or request.target_ip != self.ip:
            self.metrics["rx_accepted_unusual"] += 1
            return
        reply = pk.arp(2, MMDS_MAC, self.ip, request.sender_mac, request.sender_ip)
        self._emit(pk.ethernet(request.sender_mac, MMDS_MAC, pk.ETH_P_ARP, reply))

    def _ip(self, eth: pk.Ethernet) -> None:
        packet = pk.parse_ipv4(eth.payload)
        if packet.dst != self.ip or packet.protocol != pk.IPPROTO_TCP:
            self.metrics["rx_accepted_unusual"] += 1
            return
        seg = pk.parse_tcp(packet.payload)
        if seg.dst_port != HTTP_PORT:
            if not seg.flags & pk.TCP_RST:
                self._reset_for(eth.src, packet.src, seg)
            return
        key = (packet.src, seg.src_port)
        conn = self.conns.get(key)
        if conn is None:
            self._new_connection(eth.src, packet.src, seg)
        else:
            self._segment(conn, seg)

    def _reset_for(self, mac: bytes, ip: bytes, seg: pk.Tcp) -> None:
        """RST answering `seg` from a connection we do not have (RFC 793 reset generation)."""
        self.metrics["connections_reset"] += 1
        if seg.flags & pk.TCP_ACK:
            self._emit_tcp(mac, ip, seg.dst_port, seg.src_port, seg.ack, 0, pk.TCP_RST, 0)
        else:
            length = len(seg.payload) + (1 if seg.flags & pk.TCP_SYN else 0) + (1 if seg.flags & pk.TCP_FIN else 0)
            self._emit_tcp(mac, ip, seg.dst_port, seg.src_port, 0, seg.seq + length, pk.TCP_RST | pk.TCP_ACK, 0)

    def _new_connection(self, mac: bytes, ip: bytes, seg: pk.Tcp) -> None:
        if seg.flags & pk.TCP_RST:
            return
        if seg.flags & (pk.TCP_SYN | pk.TCP_ACK) != pk.TCP_SYN or len(self.conns) >= MAX_CONNECTIONS:
            self._reset_for(mac, ip, seg)
            return
        iss = self._rng.getrandbits(32)
        conn = Connection(mac, ip, seg.src_port, iss, (seg.seq + 1) & _M32, snd_una=iss, snd_nxt=(iss + 1) & _M32)
        conn.peer_mss = max(64, min(seg.mss or 536, MSS))
        conn.peer_window = seg.window
        conn.last_activity = self.clock()
        self.conns[(ip, seg.src_port)] = conn
        self.metrics["connections_created"] += 1
        self._send_syn_ack(conn)
        self._arm(conn)

    def _send_syn_ack(self, conn: Connection) -> None:
        self._emit_conn(conn, conn.iss, pk.TCP_SYN | pk.TCP_ACK, mss=MSS)

    def _segment(self, conn: Connection, seg: pk.Tcp) -> None:
        conn.last_activity = self.clock()
        if seg.flags & pk.TCP_RST:
            self._drop(conn)
            return
        if seg.flags & pk.TCP_SYN:
            if not conn.established and seg.seq == (conn.rcv_nxt - 1) & _M32:
                self._send_syn_ack(conn)  # our SYN-ACK was lost: the guest repeats its SYN
            else:
                self._reset(conn)
            return
        if not seg.flags & pk.TCP_ACK:
            return
        self._ack(conn, seg)
        need_ack = self._data(conn, seg)
        if not self._serve(conn):
            return
        sent = self._transmit(conn)
        if need_ack and not sent:
            self._emit_conn(conn, conn.snd_nxt, pk.TCP_ACK)
        if conn.fin_acked and conn.peer_fin:
            self._drop(conn)

    def _ack(self, conn: Connection, seg: pk.Tcp) -> None:
        conn.peer_window = seg.window
        ack = seg.ack
        if not _after(ack, conn.snd_una) or _after(ack, conn.snd_nxt):
            return  # a duplicate, or an ACK of what we never sent
        advanced = (ack - conn.snd_una) & _M32
        if not conn.established:
            conn.established = True
            advanced -= 1
        if conn.fin_sent and ack == conn.snd_nxt:
            conn.fin_acked = True
            advanced -= 1
        del conn.unacked[: max(0, advanced)]
        conn.snd_una = ack
        conn.retries, conn.rto = 0, INITIAL_RTO_S
        conn.deadline = None
        self._arm(conn)

    def _data(self, conn: Connection, seg: pk.Tcp) -> bool:
        """Take in-order payload and FIN; True when an ACK is owed."""
        payload = seg.payload
        if not payload and not seg.flags & pk.TCP_FIN:
            return False
        if not conn.established or seg.seq != conn.rcv_nxt or conn.peer_fin:
            return True  # out of order, a repeat, or after the guest's FIN: re-ACK what we have
        take = payload[: conn.window()]
        conn.inbuf += take
        conn.rcv_nxt = (conn.rcv_nxt + len(take)) & _M32
        if seg.flags & pk.TCP_FIN and len(take) == len(payload):
            conn.rcv_nxt = (conn.rcv_nxt + 1) & _M32
            conn.peer_fin = True
        return True

    def _serve(self, conn: Connection) -> bool:
        """Answer the complete requests in the buffer while the send buffer has room; False if
        the connection was reset. Requests left waiting keep our window closed (backpressure)."""
        while conn.inbuf and not conn.close_after:
            if len(conn.unacked) >= SEND_BUFFER_BYTES:
                self.metrics["send_buffer_full"] += 1
                return True  # answered when the guest acknowledges; the guest's FIN waits too
            try:
                parsed = parse_request(bytes(conn.inbuf))
            except HttpError as e:
                if e.status == 413:
                    self._reset(conn)
                    return False
                conn.unacked += response(e.status, str(e))
                conn.close_after = True
                break
            if parsed is None:
                if len(conn.inbuf) >= MAX_REQUEST_BYTES:
                    self._reset(conn)
                    return False
                break
            request, used = parsed
            del conn.inbuf[:used]
            conn.unacked += self.service.handle(request)
            self.metrics["tx_count"] += 1
            if not request.keep_alive:
                conn.close_after = True
        if conn.peer_fin:
            conn.close_after = True  # half-close: answer what came, then close our side
        return True

    def _transmit(self, conn: Connection) -> bool:
        """Send what the guest's window allows, then our FIN; True if anything went out."""
        sent_any = False
        while True:
            offset = conn.sent_data
            in_flight = (conn.snd_nxt - conn.snd_una) & _M32
            room = conn.peer_window - in_flight
            chunk = bytes(conn.unacked[offset : offset + min(conn.peer_mss, max(0, room))])
            if not chunk:
                break
            self._emit_conn(conn, conn.snd_nxt, pk.TCP_ACK | pk.TCP_PSH, chunk)
            conn.snd_nxt = (conn.snd_nxt + len(chunk)) & _M32
            sent_any = True
        if conn.close_after and not conn.fin_sent and conn.sent_data == len(conn.unacked):
            self._emit_conn(conn, conn.snd_nxt, pk.TCP_FIN | pk.TCP_ACK)
            conn.snd_nxt = (conn.snd_nxt + 1) & _M32
            conn.fin_sent = True
            sent_any = True
        self._arm(conn)
        return sent_any

    def _arm(self, conn: Connection) -> None:
        """Run the retransmission (or zero-window probe) timer while something waits."""
        waiting = conn.snd_nxt != conn.snd_una or conn.sent_data < len(conn.unacked)
        if not waiting:
            conn.deadline = None
        elif conn.deadline is None:
            conn.deadline = self.clock() + conn.rto

    # --- timers ------------------------------------------------------------------------------

    def next_timeout(self) -> float | None:
        deadlines = [c.deadline for c in self.conns.values() if c.deadline is not None]
        if self.conns:
            deadlines.append(min(c.last_activity for c in self.conns.values()) + IDLE_TIMEOUT_S)
        return None if not deadlines else max(0.0, min(deadlines) - self.clock())

    def on_timer(self) -> None:
        now = self.clock()
        for conn in list(self.conns.values()):
            if now - conn.last_activity >= IDLE_TIMEOUT_S:
                self._reset(conn)
            elif conn.deadline is not None and now >= conn.deadline:
                self._retransmit(conn)

    def _retransmit(self, conn: Connection) -> None:
        """Go back to snd_una and send again (a one-byte probe when the guest's window is 0)."""
        conn.retries += 1
        if conn.retries > MAX_RETRIES:
            self._reset(conn)
            return
        self.metrics["retransmissions"] += 1
        conn.rto = min(conn.rto * 2, 10.0)
        conn.deadline = self.clock() + conn.rto
        if not conn.established:
            self._send_syn_ack(conn)
            return
        conn.snd_nxt, conn.fin_sent = conn.snd_una, False
        if conn.peer_window == 0 and conn.unacked:
            self._emit_conn(conn, conn.snd_nxt, pk.TCP_ACK, bytes(conn.unacked[:1]))
            conn.snd_nxt = (conn.snd_nxt + 1) & _M32
        else:
            self._transmit(conn)

    # --- output ----------------------------------------------------------------------------

    def _reset(self, conn: Connection) -> None:
        self._emit_conn(conn, conn.snd_nxt, pk.TCP_RST | pk.TCP_ACK)
        self.metrics["connections_reset"] += 1
        self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        if self.conns.pop((conn.guest_ip, conn.guest_port), None) is not None:
            self.metrics["connections_destroyed"] += 1

    def _emit_conn(self, conn: Connection, seq: int, flags: int, payload: bytes = b"", mss: int | None = None) -> None:
        mac, ip, port = conn.guest_mac, conn.guest_ip, conn.guest_port
        self._emit_tcp(mac, ip, HTTP_PORT, port, seq, conn.rcv_nxt, flags, conn.window(), payload, mss)

    def _emit_tcp(
        self,
        mac: bytes,
        ip: bytes,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes = b"",
        mss: int | None = None,
    ) -> None:
        segment = pk.tcp(self.ip, ip, sport, dport, seq, ack, flags, window, payload, mss)
        self._ident += 1
        self._emit(pk.ethernet(mac, MMDS_MAC, pk.ETH_P_IP, pk.ipv4(self.ip, ip, pk.IPPROTO_TCP, segment, self._ident)))

    def _emit(self, frame: bytes) -> None:
        if len(self.output) >= MAX_OUTPUT_FRAMES:
            self.metrics["tx_errors"] += 1
            return
        self.output.append(frame)
        self.metrics["tx_frames"] += 1
        self.metrics["tx_bytes"] += len(frame)

    def take_output(self) -> list[bytes]:
        frames = list(self.output)
        self.output.clear()
        return frames

"""The vsock device and its AF_UNIX muxer in one process: a mock guest on the queues, real
Unix sockets on the host side."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from devices.vsock import backend as backend_mod
from devices.vsock.connection import CREDIT_UPDATE_THRESHOLD, TX_BUF_SIZE
from devices.vsock.device import RX, TX
from devices.vsock.packet import (
    EVENT_TRANSPORT_RESET,
    HOST_CID,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_SEQPACKET,
    Op,
    header_bytes,
)
from devices.vsock.testing import VsockRig, read_line
from shared.virtio import constants as c

GUEST_PORT = 52


def open_host_conn(rig: VsockRig, port: int = GUEST_PORT) -> tuple[socket.socket, int]:
    """A host-initiated connection the guest accepts; (host socket, host-side port)."""
    host = rig.host_connect(port)
    req = rig.guest.take(Op.REQUEST)
    assert (req.header.src_cid, req.header.dst_cid, req.header.dst_port) == (HOST_CID, 3, port)
    rig.guest.send(port, req.header.src_port, Op.RESPONSE)
    assert read_line(host) == f"OK {req.header.src_port}\n".encode()
    return host, req.header.src_port


def open_guest_conn(rig: VsockRig, listener: socket.socket, guest_port: int = 1000, **kw) -> socket.socket:
    rig.guest.send(guest_port, 53, Op.REQUEST, **kw)
    resp = rig.guest.take(Op.RESPONSE, port=guest_port)
    assert (resp.header.src_port, resp.header.dst_port) == (53, guest_port)
    conn, _ = listener.accept()
    conn.settimeout(5)
    return rig.own(conn)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


def guest_data(rig: VsockRig, port: int, n: int) -> bytes:
    """Collect `n` bytes of RW payload for guest port `port`."""
    got = b""
    while len(got) < n:
        got += rig.guest.take(Op.RW, port=port).payload
    return got


# --- configuration --------------------------------------------------------------------------


def test_config_space_holds_the_guest_cid_as_le64(rig: VsockRig) -> None:
    assert rig.device.read_config(0, 8) == (3).to_bytes(8, "little")
    assert rig.device.device_type == c.VIRTIO_ID_VSOCK == 19
    assert rig.device.queue_max_sizes == (256, 256, 256)


def test_guest_cid_below_3_is_refused() -> None:
    with pytest.raises(ValueError, match="guest_cid"):
        from devices.vsock.device import VsockDevice

        VsockDevice(2, None)  # type: ignore[arg-type]


# --- host-initiated --------------------------------------------------------------------------


def test_host_connects_with_connect_line_and_bytes_flow_both_ways(rig: VsockRig) -> None:
    host, host_port = open_host_conn(rig)

    host.sendall(b"to the guest")
    assert guest_data(rig, GUEST_PORT, 12) == b"to the guest"
    rig.guest.send(GUEST_PORT, host_port, Op.RW, b"to the host")
    assert recv_exactly(host, 11) == b"to the host"
    assert rig.muxer.counters["conns_added"] == 1


def test_bytes_sent_right_after_the_connect_line_are_not_lost(rig: VsockRig) -> None:
    host = rig.own(socket.socket(socket.AF_UNIX))
    host.connect(rig.uds_path)
    host.sendall(b"CONNECT 52\nearly bytes")
    req = rig.guest.take(Op.REQUEST)
    rig.guest.send(GUEST_PORT, req.header.src_port, Op.RESPONSE)

    assert read_line(host).startswith(b"OK ")
    assert guest_data(rig, GUEST_PORT, 11) == b"early bytes"


def test_guest_refusing_closes_the_host_socket(rig: VsockRig) -> None:
    host = rig.host_connect(99)
    req = rig.guest.take(Op.REQUEST)
    rig.guest.send(99, req.header.src_port, Op.RST)
    rig.pump()

    assert read_line(host) == b""  # closed, no OK line
    assert rig.muxer.conns == {}


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x\n", b"connect 5\n", b"CONNECT 99999999999\n", b"A" * 40])
def test_bad_connect_line_closes_the_host_socket(rig: VsockRig, line: bytes) -> None:
    host = rig.own(socket.socket(socket.AF_UNIX))
    host.connect(rig.uds_path)
    host.sendall(line)
    rig.guest.wait_for(lambda: rig.muxer.counters["host_connect_bad_lines"] == 1)

    assert read_line(host) == b""
    assert rig.muxer.conns == {} and rig.muxer.pending == {}


def test_silent_host_connection_is_dropped_after_the_connect_timeout(sock_dir: str) -> None:
    now = [100.0]
    with VsockRig(f"{sock_dir}/v.sock", clock=lambda: now[0]) as rig:
        host = rig.own(socket.socket(socket.AF_UNIX))
        host.connect(rig.uds_path)
        rig.guest.wait_for(lambda: rig.muxer.pending)
        assert rig.muxer.next_timeout() == pytest.approx(backend_mod.CONNECT_TIMEOUT_S)

        now[0] += backend_mod.CONNECT_TIMEOUT_S
        rig.device.process_timer()

        assert read_line(host) == b""


# --- guest-initiated ------------------------------------------------------------------------


def test_guest_connects_to_uds_path_underscore_port(rig: VsockRig, host_listener: socket.socket) -> None:
    conn = open_guest_conn(rig, host_listener)

    rig.guest.send(1000, 53, Op.RW, b"ping")
    assert recv_exactly(conn, 4) == b"ping"
    conn.sendall(b"pong")
    assert guest_data(rig, 1000, 4) == b"pong"


def test_guest_connect_with_nobody_listening_gets_rst(rig: VsockRig) -> None:
    rig.guest.send(1000, 54, Op.REQUEST)

    rst = rig.guest.take(Op.RST)
    assert (rst.header.src_port, rst.header.dst_port) == (54, 1000)
    assert rig.muxer.counters["guest_connect_refused"] == 1


# --- half-close and close ------------------------------------------------------------------


def test_guest_half_close_gives_the_host_eof_and_the_host_can_still_write(rig, host_listener) -> None:
    conn = open_guest_conn(rig, host_listener)
    rig.guest.send(1000, 53, Op.RW, b"request")
    rig.guest.send(1000, 53, Op.SHUTDOWN, flags=SHUTDOWN_SEND)

    assert recv_exactly(conn, 7) == b"request"
    assert conn.recv(10) == b""  # EOF
    conn.sendall(b"reply after EOF")
    assert guest_data(rig, 1000, 15) == b"reply after EOF"


def test_host_half_close_sends_shutdown_send_and_the_guest_can_still_write(rig) -> None:
    host, host_port = open_host_conn(rig)
    host.sendall(b"last words")
    host.shutdown(socket.SHUT_WR)

    assert guest_data(rig, GUEST_PORT, 10) == b"last words"
    shutdown = rig.guest.take(Op.SHUTDOWN)
    assert shutdown.header.flags == SHUTDOWN_SEND
    rig.guest.send(GUEST_PORT, host_port, Op.RW, b"answer")
    assert recv_exactly(host, 6) == b"answer"


def test_both_half_closes_end_the_connection_with_rst(rig, host_listener) -> None:
    conn = open_guest_conn(rig, host_listener)
    rig.guest.send(1000, 53, Op.SHUTDOWN, flags=SHUTDOWN_SEND)
    assert conn.recv(1) == b""
    conn.shutdown(socket.SHUT_WR)

    assert rig.guest.take(Op.SHUTDOWN).header.flags == SHUTDOWN_SEND
    rig.guest.take(Op.RST)
    assert rig.muxer.conns == {}


def test_guest_close_flushes_then_closes_the_host_socket_and_confirms_with_rst(rig, host_listener) -> None:
    conn = open_guest_conn(rig, host_listener)
    rig.guest.send(1000, 53, Op.RW, b"bye")
    rig.guest.send(1000, 53, Op.SHUTDOWN, flags=SHUTDOWN_BOTH)

    rig.guest.take(Op.RST)
    assert recv_exactly(conn, 3) == b"bye" and conn.recv(1) == b""
    assert rig.muxer.conns == {}


def test_host_close_sends_shutdown_both_and_the_guest_rst_ends_it(rig) -> None:
    host, host_port = open_host_conn(rig)
    host.close()

    assert rig.guest.take(Op.SHUTDOWN).header.flags == SHUTDOWN_BOTH
    rig.guest.send(GUEST_PORT, host_port, Op.RST)
    assert rig.muxer.conns == {}


def test_guest_shutdown_rcv_stops_reading_the_host(rig) -> None:
    host, host_port = open_host_conn(rig)
    rig.guest.send(GUEST_PORT, host_port, Op.SHUTDOWN, flags=SHUTDOWN_RCV)
    host.sendall(b"unwanted")
    rig.pump(0.05)

    assert not [p for p in rig.guest.collect() if p.op == Op.RW]


# --- credit ------------------------------------------------------------------------------------


def test_host_to_guest_respects_the_guests_credit_and_asks_for_more(rig, host_listener) -> None:
    conn = open_guest_conn(rig, host_listener, buf_alloc=1000)
    conn.sendall(b"x" * 3000)

    assert guest_data(rig, 1000, 1000) == b"x" * 1000
    rig.guest.take(Op.CREDIT_REQUEST)
    rig.pump(0.05)
    assert not [p for p in rig.guest.collect() if p.op == Op.RW]  # nothing beyond the credit

    rig.guest.send(1000, 53, Op.CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=1000)
    assert guest_data(rig, 1000, 1000) == b"x" * 1000


def test_guest_overrunning_its_credit_is_reset_and_the_buffer_stays_bounded(rig, host_listener) -> None:
    conn = open_guest_conn(rig, host_listener)  # the host never reads
    chunk = b"y" * 65536
    sent = 0
    while not rig.muxer.counters["credit_violations"]:
        rig.guest.send(1000, 53, Op.RW, chunk)
        rig.guest.collect()
        sent += len(chunk)
        live = rig.muxer.conns.get((53, 1000))
        if live is not None:
            assert len(live.tx_buf) <= TX_BUF_SIZE
        assert sent < 16 * TX_BUF_SIZE, "the guest was never stopped"

    rig.guest.take(Op.RST, port=1000)
    assert rig.muxer.conns == {}
    conn.close()


def test_credit_update_is_sent_once_the_host_has_read_enough(rig, host_listener) -> None:
    conn = open_guest_conn(rig, host_listener)
    rig.guest.send(1000, 53, Op.RW, b"z" * CREDIT_UPDATE_THRESHOLD)
    recv_exactly(conn, CREDIT_UPDATE_THRESHOLD)

    update = rig.guest.take(Op.CREDIT_UPDATE, port=1000)
    assert update.header.fwd_cnt == CREDIT_UPDATE_THRESHOLD
    assert update.header.buf_alloc == TX_BUF_SIZE


def test_credit_request_is_answered_with_a_credit_update(rig, host_listener) -> None:
    open_guest_conn(rig, host_listener)
    rig.guest.send(1000, 53, Op.CREDIT_REQUEST)

    assert rig.guest.take(Op.CREDIT_UPDATE, port=1000).header.buf_alloc == TX_BUF_SIZE


# --- many connections, big transfers ---------------------------------------------------------------


def test_64_connections_are_served_without_head_of_line_blocking(rig, host_listener) -> None:
    # connection 0's guest gives no credit and its host never reads: it must hold up nobody
    stuck = open_guest_conn(rig, host_listener, guest_port=2000, buf_alloc=0)
    stuck.sendall(b"s" * 100_000)
    conns = [open_guest_conn(rig, host_listener, guest_port=3000 + i) for i in range(64)]
    for i, conn in enumerate(conns):
        conn.sendall(f"conn {i:02d}".encode())
        rig.guest.send(3000 + i, 53, Op.RW, f"back {i:02d}".encode())
    for i, conn in enumerate(conns):
        assert guest_data(rig, 3000 + i, 7) == f"conn {i:02d}".encode()
        assert recv_exactly(conn, 7) == f"back {i:02d}".encode()
    assert len(rig.muxer.conns) == 65


@pytest.mark.parametrize("direction", ["host_to_guest", "guest_to_host"])
def test_64_mib_stream_arrives_with_the_same_checksum(sock_dir: str, host_listener, direction: str) -> None:
    total = 64 << 20
    block = os.urandom(1 << 16)
    with VsockRig(f"{sock_dir}/v.sock") as rig:
        rig.guest.rx_buf = 65536 + 44
        rig.guest.post_rx(64)
        conn = open_guest_conn(rig, host_listener, buf_alloc=1 << 20)
        sent, got = hashlib.sha256(), hashlib.sha256()
        if direction == "host_to_guest":
            conn.setblocking(False)
            pending, received, fwd = 0, 0, 0
            while received < total:
                if pending < total:
                    try:
                        n = conn.send(block)
                        sent.update(block[:n])
                        pending += n
                    except BlockingIOError:
                        pass
                rig.pump(0.001)
                for pkt in rig.guest.collect():
                    if pkt.op == Op.RW:
                        got.update(pkt.payload)
                        received += len(pkt.payload)
                rig.guest.post_rx(64 - rig.guest.rx.size + len(rig.guest.rx._free), kick=False)
                rig.kick(RX)
                if received - fwd >= 256 << 10:  # the guest's app read it: tell the device
                    fwd = received
                    rig.guest.send(1000, 53, Op.CREDIT_UPDATE, buf_alloc=1 << 20, fwd_cnt=fwd)
        else:
            conn.setblocking(False)
            received, offset = 0, 0
            while received < total:
                while offset < total and offset + len(block) - rig.muxer.conns[(53, 1000)].fwd_cnt <= TX_BUF_SIZE:
                    rig.guest.send(1000, 53, Op.RW, block)
                    sent.update(block)
                    offset += len(block)
                    rig.guest.collect()
                try:
                    while chunk := conn.recv(1 << 20):
                        got.update(chunk)
                        received += len(chunk)
                except BlockingIOError:
                    pass
                rig.pump(0.001)
                rig.guest.collect()
        assert received == total
        assert got.hexdigest() == sent.hexdigest()


# --- bad input ------------------------------------------------------------------------------------


def test_malformed_packets_are_dropped_and_counted_never_fatal(rig: VsockRig) -> None:
    g = rig.guest
    g.send_raw(b"\0" * 20)  # shorter than a header
    g.send_raw(header_bytes(3, 2, 1, 2, Op.RW, length=100) + b"short")
    g.send_raw(header_bytes(7, 2, 1, 2, Op.REQUEST))  # not the guest's CID
    g.send_raw(header_bytes(3, 9, 1, 2, Op.REQUEST))  # not to the host
    rig.pump()

    assert rig.device.metrics["tx_malformed_packets"] == 2
    assert rig.device.metrics["tx_bad_cid_packets"] == 2
    assert rig.interrupt.needs_reset == []
    assert g.collect() == []  # nothing answered


@pytest.mark.parametrize(
    ("raw", "counter"),
    [
        (header_bytes(3, 2, 1000, 53, 42), "unknown_op_packets"),
        (header_bytes(3, 2, 1000, 53, Op.REQUEST, type_=TYPE_SEQPACKET), "bad_type_packets"),
        (header_bytes(3, 2, 1000, 53, Op.RW, length=3) + b"abc", "unknown_conn_packets"),
        (header_bytes(3, 2, 1000, 53, Op.SHUTDOWN, flags=SHUTDOWN_BOTH), "unknown_conn_packets"),
    ],
)
def test_packets_for_no_connection_or_unknown_ops_get_rst(rig: VsockRig, raw: bytes, counter: str) -> None:
    rig.guest.send_raw(raw)

    rst = rig.guest.take(Op.RST)
    assert (rst.header.src_port, rst.header.dst_port) == (53, 1000)
    assert rig.muxer.counters[counter] == 1


def test_unknown_op_on_a_live_connection_resets_it(rig, host_listener) -> None:
    conn = open_guest_conn(rig, host_listener)
    rig.guest.send_raw(header_bytes(3, 2, 1000, 53, 99))

    rig.guest.take(Op.RST, port=1000)
    assert conn.recv(1) == b""
    assert rig.muxer.conns == {}


def test_rst_for_no_connection_gets_no_answer(rig: VsockRig) -> None:
    rig.guest.send_raw(header_bytes(3, 2, 1000, 53, Op.RST))
    rig.pump()

    assert rig.guest.collect() == []


def test_rx_buffer_too_small_for_a_header_is_returned_empty(rig: VsockRig) -> None:
    rig.guest.rx.used()
    rig.guest.post_rx(1, size=16)  # behind 64 good ones: make them the only ones
    rig.guest.send(1000, 54, Op.REQUEST)  # RST needed

    assert rig.guest.take(Op.RST)


def test_a_guest_short_of_rx_buffers_stalls_its_own_tx_and_the_backlog_stays_bounded(rig: VsockRig) -> None:
    rig.guest.collect()
    for i in range(255):  # each wants an RST back; 64 rx buffers are posted
        rig.guest.send(i, 53, Op.RW, b"x", kick=False)
    rig.kick(TX)

    assert len(rig.muxer.rst_queue) <= backend_mod.MAX_PENDING_RST
    assert rig.device.metrics["tx_packets_count"] < 255  # tx stopped, the rest stays in the ring
    assert rig.muxer.counters["rst_dropped"] == 0
    # the guest gives rx buffers again: tx goes on, every packet gets its RST
    rig.guest.wait_for(lambda: sum(p.op == Op.RST for p in rig.guest.received) == 255)
    assert rig.device.metrics["tx_packets_count"] == 255


# --- transport reset ----------------------------------------------------------------------------


def test_transport_reset_event_drops_connections_and_reaches_the_event_queue(rig: VsockRig) -> None:
    host, _ = open_host_conn(rig)
    rig.device.transport_reset()  # no event buffer yet: kept
    assert read_line(host) == b""

    rig.guest.post_events(2)
    rig.guest.collect()
    assert rig.guest.events == [EVENT_TRANSPORT_RESET.to_bytes(4, "little")]
    assert rig.device.metrics["transport_reset_events"] == 1
    assert rig.muxer.conns == {}


def test_device_reset_closes_every_host_socket(rig, host_listener) -> None:
    conn = open_guest_conn(rig, host_listener)
    rig.device.reset()

    assert conn.recv(1) == b""
    assert not rig.device.active


def test_tx_queue_index_out_of_range_is_ignored(rig: VsockRig) -> None:
    rig.device.process_queue(7)
    rig.device.process_queue(TX)
    assert rig.interrupt.needs_reset == []


def test_transport_reset_asked_before_activation_is_sent_once_active(sock_dir: str) -> None:
    from devices.vsock.device import VsockDevice
    from devices.vsock.testing import FEATURES
    from shared.virtio.testing import FakeInterrupt, MockDriver, make_guest_memory

    mem = make_guest_memory()
    try:
        device = VsockDevice(3, backend_mod.UnixMuxer(3, f"{sock_dir}/v.sock", None))
        device.transport_reset()  # a restored worker does this before the guest's driver is back
        drivers = [MockDriver(mem, 16, base=0x10000 + i * 0x100000, data_size=0x10000) for i in range(3)]
        drivers[2].add_chain([], [4])

        device.activate(mem, [d.queue() for d in drivers], FakeInterrupt(), FEATURES)

        assert drivers[2].used() == [(0, 4)]
        assert drivers[2].written(0) == [EVENT_TRANSPORT_RESET.to_bytes(4, "little")]
    finally:
        device.backend.close()  # type: ignore[attr-defined]
        mem.close()


def test_guest_that_never_answers_a_host_connect_gets_rst_and_the_host_is_closed(sock_dir: str) -> None:
    from devices.vsock.connection import REQUEST_TIMEOUT_S

    now = [100.0]
    with VsockRig(f"{sock_dir}/v.sock", clock=lambda: now[0]) as rig:
        host = rig.host_connect(GUEST_PORT)
        req = rig.guest.take(Op.REQUEST)
        assert rig.muxer.next_timeout() == pytest.approx(REQUEST_TIMEOUT_S)

        now[0] += REQUEST_TIMEOUT_S
        rig.device.process_timer()

        rst = rig.guest.take(Op.RST)
        assert rst.header.src_port == req.header.src_port
        assert read_line(host) == b""
        assert rig.muxer.conns == {}


def test_closing_connection_is_reset_when_the_guest_does_not_answer_shutdown(sock_dir: str) -> None:
    from devices.vsock.connection import SHUTDOWN_TIMEOUT_S

    now = [100.0]
    with VsockRig(f"{sock_dir}/v.sock", clock=lambda: now[0]) as rig:
        host, _ = open_host_conn(rig)
        host.close()
        rig.guest.take(Op.SHUTDOWN)  # both flags; the guest should RST, but stays silent

        now[0] += SHUTDOWN_TIMEOUT_S
        rig.device.process_timer()

        rig.guest.take(Op.RST)
        assert rig.muxer.conns == {}


def test_connection_limit_refuses_both_directions(sock_dir: str, host_listener: socket.socket) -> None:
    with VsockRig(f"{sock_dir}/v.sock", max_connections=2) as rig:
        open_guest_conn(rig, host_listener, guest_port=1000)
        open_guest_conn(rig, host_listener, guest_port=1001)

        rig.guest.send(1002, 53, Op.REQUEST)
        assert rig.guest.take(Op.RST).header.dst_port == 1002
        host = rig.host_connect(GUEST_PORT)
        rig.guest.wait_for(lambda: rig.muxer.counters["host_connect_refused"] == 1)
        assert read_line(host) == b""
        assert len(rig.muxer.conns) == 2


def test_an_internal_error_stops_the_backend_and_asks_for_a_reset(rig: VsockRig, host_listener) -> None:
    from devices.vsock.worker import VsockHooks
    from shared.eventloop import EventLoop

    conn = open_guest_conn(rig, host_listener)
    transport = FakeTransport()
    hooks = VsockHooks(rig.device, rig.muxer, transport)  # type: ignore[arg-type]
    with EventLoop() as loop:
        hooks.install(loop)
        rig.muxer.notify = lambda: 1 / 0  # type: ignore[method-assign]

        hooks.process(0, 0)

        assert hooks.broken and transport.reasons == ["internal error: ZeroDivisionError('division by zero')"]
        assert conn.recv(1) == b""  # connections dropped
        assert loop.run_once(0) == 0  # the backend's fd is no longer polled
        hooks.process(0, 0)  # ignored from now on
        assert rig.muxer.counters["muxer_event_fails"] == 1


class FakeTransport:
    serving = True

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def signal_needs_reset(self, reason: str) -> None:
        self.reasons.append(reason)


def test_rx_buffers_with_no_room_for_data_stall_only_that_data(sock_dir: str, host_listener) -> None:
    with VsockRig(f"{sock_dir}/v.sock", rx_posted=2) as rig:
        g = rig.guest
        conn = open_guest_conn(rig, host_listener)
        g.rx_buf = 44  # from now on the guest posts buffers with room for a header only
        g.send(1000, 53, Op.CREDIT_REQUEST)
        g.send(1000, 53, Op.CREDIT_REQUEST)
        g.wait_for(lambda: sum(p.op == Op.CREDIT_UPDATE for p in g.received) == 2)  # the big ones used up
        conn.sendall(b"waiting")

        rig.pump(0.05)  # returns: the data fits nowhere, nothing spins; the small buffers
        # carry credit updates instead, so the guest's next, larger buffer gets the data
        got = g.collect()
        assert got and all(p.op == Op.CREDIT_UPDATE for p in got)
        g.rx_buf = 4096 + 44
        g.post_rx(1)
        assert guest_data(rig, 1000, 7) == b"waiting"


def test_busy_connections_take_turns_for_rx_buffers(sock_dir: str, host_listener) -> None:
    with VsockRig(f"{sock_dir}/v.sock", rx_posted=4) as rig:
        a = open_guest_conn(rig, host_listener, guest_port=1000)
        b = open_guest_conn(rig, host_listener, guest_port=1001)
        rig.guest.collect()
        a.sendall(b"a" * 100_000)  # both have far more than a few buffers' worth
        b.sendall(b"b" * 100_000)
        rig.pump(0.05)
        rig.pump(0.05)

        rig.guest.rx.used()
        rig.guest.post_rx(8)  # eight buffers for two busy connections
        order = [p.header.dst_port for p in rig.guest.collect() if p.op == Op.RW]

        assert order.count(1000) >= 3 and order.count(1001) >= 3, order


def test_guest_closing_after_the_host_went_away_gets_rst_at_once(rig: VsockRig) -> None:
    host, host_port = open_host_conn(rig)
    host.close()
    assert rig.guest.take(Op.SHUTDOWN).header.flags == SHUTDOWN_BOTH

    rig.guest.send(GUEST_PORT, host_port, Op.SHUTDOWN, flags=SHUTDOWN_BOTH)  # its close(), not an RST

    rig.guest.take(Op.RST)  # no 2 s wait
    assert rig.muxer.conns == {}


def test_tx_buffers_of_all_connections_share_one_budget(sock_dir: str, host_listener: socket.socket) -> None:
    """Each connection stays within its credit, but host readers that never read on many
    connections must not add up to 1023 x 256 KiB: past the budget the connection is reset."""
    budget = 3 * TX_BUF_SIZE
    with VsockRig(f"{sock_dir}/v.sock", tx_buffer_budget=budget) as rig:
        ports = list(range(1000, 1010))
        for port in ports:
            open_guest_conn(rig, host_listener, guest_port=port)  # the host never reads
            sock = rig.muxer.conns[(53, port)].sock  # and its socket takes little: bytes wait in tx_buf
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        chunk = b"q" * 32768
        for _ in range(TX_BUF_SIZE // len(chunk)):  # each guest sends exactly its credit
            for port in ports:
                if (53, port) in rig.muxer.conns:
                    rig.guest.send(port, 53, Op.RW, chunk)
            rig.guest.collect()
            buffered = sum(len(conn.tx_buf) for conn in rig.muxer.conns.values())
            assert buffered == rig.muxer.tx_budget.used <= budget
        assert rig.muxer.counters["tx_budget_resets"] > 0
        assert rig.muxer.counters["credit_violations"] == 0  # nobody overran its credit
        rig.guest.take(Op.RST)
        assert len(rig.muxer.conns) < len(ports)
        rig.device.reset()
        assert rig.muxer.tx_budget.used == 0  # every buffer given back

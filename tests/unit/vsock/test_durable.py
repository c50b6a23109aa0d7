"""The vsock connection table and a replacement worker's resume (docs/faults.md, "Vsock
connections"): torn records, the rx packet in flight at a crash (published or not: its
bytes reach the guest once), a guest send in doubt (that connection is reset, no other),
and the supervisor's kept sockets."""

from __future__ import annotations

import socket

import pytest

from controlplane.vsock_sockets import KeptSockets
from devices.vsock.backend import SO_PEEK_OFF, UnixMuxer
from devices.vsock.connection import Connection, State
from devices.vsock.durable import REGION_BYTES, RX_INTENT, TX_INTENT, ConnTable, Record
from devices.vsock.packet import HEADER, Header, Op, TxPacket


def new_table() -> ConnTable:
    return ConnTable(memoryview(bytearray(REGION_BYTES)))


def muxer(table: ConnTable, released: list[int]) -> UnixMuxer:
    return UnixMuxer(3, "/tmp/vs-none/v.sock", None, table=table, release=released.append)


def kept_pair() -> tuple[socket.socket, socket.socket]:
    """(the host's end, the end the supervisor keeps and the worker uses)."""
    host, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    return host, ours


def conn_record(sock: socket.socket, sock_id: int, peer: int = 2000, **fields: int) -> tuple[int, ...]:
    conn = Connection(sock, 3, 53, peer, State.ESTABLISHED, {})
    conn.sock_id = sock_id
    for name, value in fields.items():
        setattr(conn, name, value)
    return conn.record()


def test_a_torn_copy_leaves_the_record_before_it() -> None:
    table = new_table()
    host, ours = kept_pair()
    first, second = conn_record(ours, 1, rx_cnt=10), conn_record(ours, 1, rx_cnt=20)
    index = table.allocate()
    assert index is not None
    table.write(index, first)
    table.write(index, second)
    assert table.read(index) == Record(second, second)
    # the worker died in the middle of a third write: that copy's payload is half there
    table.write(index, conn_record(ours, 1, rx_cnt=30))
    mem = table._mem  # the copy just written is the one with the highest generation
    base = 64 + index * 512 + (0 if table._generation(index, 0) > table._generation(index, 1) else 256)
    mem[base + 40] ^= 0xFF
    assert table.read(index) == Record(second, second)
    table.release(index)
    assert table.read(index) is None
    host.close()
    ours.close()


@pytest.mark.parametrize("published", [True, False])
def test_an_rx_packet_in_flight_at_the_crash_reaches_the_guest_once(published: bool) -> None:
    table, released = new_table(), []
    host, ours = kept_pair()
    host.sendall(b"hello world")
    # the dead worker peeked 5 bytes into an rx buffer whose used entry goes to index 7
    assert ours.recv(5, socket.MSG_PEEK) == b"hello"
    index = table.allocate()
    assert index is not None
    table.write(index, conn_record(ours, 9, rx_cnt=5), RX_INTENT, 7, pre=conn_record(ours, 9, rx_cnt=0))

    m = muxer(table, released)
    assert m.resume(table.records(), {9: ours}, 8 if published else 7) == 1
    conn = m.conns[(53, 2000)]
    assert conn.rx_cnt == (5 if published else 0)
    assert ours.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) == 0
    assert ours.recv(64) == (b" world" if published else b"hello world")  # nothing twice, nothing lost
    assert released == []
    host.close()
    m.close()


def test_bytes_peeked_before_the_intent_was_recorded_are_read_again() -> None:
    table, released = new_table(), []
    host, ours = kept_pair()
    host.sendall(b"hello world")
    index = table.allocate()
    assert index is not None
    table.write(index, conn_record(ours, 9, rx_cnt=0))  # no intent: the worker died right after its peek
    assert ours.recv(5, socket.MSG_PEEK) == b"hello"
    m = muxer(table, released)
    assert m.resume(table.records(), {9: ours}, 3) == 1
    assert ours.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) == 0
    assert ours.recv(5, socket.MSG_PEEK) == b"hello"  # from the start again: nothing skipped
    host.close()
    m.close()


def test_a_send_in_doubt_resets_that_connection_and_no_other() -> None:
    table, released = new_table(), []
    host_a, ours_a = kept_pair()
    host_b, ours_b = kept_pair()
    a, b = table.allocate(), table.allocate()
    assert a is not None and b is not None
    table.write(a, conn_record(ours_a, 1, peer=2000), TX_INTENT, 40)  # killed during its sendmsg
    table.write(b, conn_record(ours_b, 2, peer=2001))

    m = muxer(table, released)
    assert m.resume(table.records(), {1: ours_a, 2: ours_b}, 0) == 1
    assert list(m.conns) == [(53, 2001)]
    assert released == [1]  # the supervisor closes its copy: the host sees the reset
    assert list(m.rst_queue) == [(53, 2000)]  # the guest too
    assert table.read(a) is None
    host_b.sendall(b"x")
    assert m.conns[(53, 2001)].sock.recv(1) == b"x"
    host_a.close()
    host_b.close()
    m.close()


def test_bytes_waiting_in_the_dead_workers_buffer_reset_the_connection() -> None:
    table, released = new_table(), []
    host, ours = kept_pair()
    index = table.allocate()
    assert index is not None
    record = list(conn_record(ours, 4))
    record[14] = 100  # tx_buf_len: bytes the guest was told were taken, lost with the worker
    table.write(index, tuple(record))
    m = muxer(table, released)
    assert m.resume(table.records(), {4: ours}, 0) == 0
    assert released == [4] and list(m.rst_queue) == [(53, 2000)]
    host.close()
    m.close()


def test_kept_sockets_the_table_does_not_know() -> None:
    table, released = new_table(), []
    host_a, accepted = kept_pair()
    host_b, stray = kept_pair()
    m = muxer(table, released)
    assert m.resume({}, {5: accepted, 6: stray}, 0, frozenset({5})) == 0
    assert released == [6]  # a guest connect never answered: closed
    assert [p.sock_id for p in m.pending.values()] == [5]  # a host connection: its CONNECT line may come
    host_a.sendall(b"CONNECT 52\n")
    m.notify()
    assert [c.local_port >= 1 << 30 and c.sock_id == 5 for c in m.conns.values()] == [True]
    host_a.close()
    host_b.close()
    m.close()


def test_a_tx_packet_applied_before_the_crash_is_not_applied_again() -> None:
    table, released = new_table(), []
    host, ours = kept_pair()
    index = table.allocate()
    assert index is not None
    table.write(index, conn_record(ours, 1, tx_pos=17))
    m = muxer(table, released)
    m.resume(table.records(), {1: ours}, 0)
    header = HEADER.pack(3, 2, 2000, 53, 4, 1, Op.RW, 0, 0, 0)
    pkt = TxPacket(Header.unpack(header), [memoryview(b"data")])
    assert m.skip_in_flight_tx(pkt, 17)
    assert not m.skip_in_flight_tx(pkt, 18)
    table.set_tx_applied(18)
    assert m.skip_in_flight_tx(pkt, 18)
    host.close()
    m.close()


def test_the_supervisor_keeps_a_bounded_set_and_the_host_sees_a_close_only_on_release() -> None:
    kept = KeptSockets(limit=1)
    host, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_id = kept.keep(ours)
    assert sock_id and ours.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) == 0
    other_host, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert kept.keep(other) == 0  # full: the caller refuses the connection
    ours.close()  # the worker's copy dies with it
    host.setblocking(False)
    with pytest.raises(BlockingIOError):
        host.recv(1)  # still open: the supervisor holds it
    kept.release([sock_id, 12345])  # an id it never had is ignored
    assert host.recv(1) == b""
    kept.close()
    for s in (host, other_host, other):
        s.close()

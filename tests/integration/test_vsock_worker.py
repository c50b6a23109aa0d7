"""The vsock worker as a real, seccomp-confined process, driven from the host: the guest's
rings in the memfd, kicks on its ioeventfds, interrupts on its irqfd, registers over its
MMIO channel, host connections on its Unix sockets."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

from devices.vsock.messages import VsockTransportReset
from devices.vsock.packet import EVENT_TRANSPORT_RESET, SHUTDOWN_BOTH, Op, header_bytes
from devices.vsock.testing import VsockWorkerHarness, read_line
from shared import protocol as p
from shared.virtio import constants as c


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vs", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def worker(launcher, sock_dir: str) -> Iterator[VsockWorkerHarness]:
    with VsockWorkerHarness(launcher.zygote, launcher.run_dir, f"{sock_dir}/v.sock", rx_buf=65536 + 44) as harness:
        assert harness.setup() & c.STATUS_DRIVER_OK
        harness.guest.post_rx(64)
        yield harness


def seccomp_mode(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Seccomp:")).split()[1])


def test_worker_runs_confined_and_reads_guest_cid_from_config(worker: VsockWorkerHarness) -> None:
    assert seccomp_mode(worker.pid) == 2
    assert worker.mmio.read(c.MMIO_DEVICE_ID, 4) == c.VIRTIO_ID_VSOCK
    assert worker.mmio.read(c.MMIO_CONFIG, 4) == 3 and worker.mmio.read(c.MMIO_CONFIG + 4, 4) == 0


def test_host_and_guest_connections_through_the_process(worker: VsockWorkerHarness, sock_dir: str) -> None:
    g = worker.guest
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{worker.uds_path}_53")
    listener.listen()
    listener.settimeout(5)
    host = socket.socket(socket.AF_UNIX)
    try:
        # guest -> host (connect under seccomp: socket(AF_UNIX) + connect)
        g.send(1000, 53, Op.REQUEST)
        g.take(Op.RESPONSE, port=1000)
        conn, _ = listener.accept()
        g.send(1000, 53, Op.RW, b"from the guest")
        conn.settimeout(5)
        assert conn.recv(100) == b"from the guest"
        g.send(1000, 53, Op.SHUTDOWN, flags=SHUTDOWN_BOTH)
        g.take(Op.RST, port=1000)
        assert conn.recv(1) == b""
        conn.close()
        # host -> guest (accept under seccomp)
        host.connect(worker.uds_path)
        host.sendall(b"CONNECT 52\n")
        req = g.take(Op.REQUEST, port=52)
        g.send(52, req.header.src_port, Op.RESPONSE)
        assert read_line(host) == f"OK {req.header.src_port}\n".encode()
        host.sendall(b"from the host")
        assert g.take(Op.RW, port=52).payload == b"from the host"
    finally:
        host.close()
        listener.close()
    assert worker.alive()


def test_hostile_tx_packets_are_counted_and_the_worker_lives(worker: VsockWorkerHarness) -> None:
    g = worker.guest
    g.send_raw(b"\xff" * 10)  # shorter than a header
    g.send_raw(header_bytes(3, 2, 1, 2, Op.RW, length=60000) + b"x")  # len past the chain
    g.send_raw(header_bytes(3, 2, 1, 2, Op.RW, length=1 << 20))  # len past the maximum
    g.send_raw(header_bytes(4, 2, 1, 2, Op.REQUEST))  # someone else's CID
    g.send_raw(header_bytes(3, 5, 1, 2, Op.REQUEST))  # to a CID that is not the host
    g.send_raw(header_bytes(3, 2, 7, 8, 77))  # unknown op
    g.send_raw(header_bytes(3, 2, 9, 10, Op.RW, length=4) + b"data")  # no such connection
    g.tx.write_descriptor(0, 0xFFFF_FFFF_0000, 64)  # a chain pointing outside guest memory
    g.tx.publish(0)
    worker.kick(1)

    rsts = {(pkt.header.src_port, pkt.header.dst_port) for pkt in [g.take(Op.RST), g.take(Op.RST)]}
    assert rsts == {(8, 7), (10, 9)}
    metrics = worker.metrics()
    assert metrics["tx_malformed_packets"] == 4
    assert metrics["tx_bad_cid_packets"] == 2
    assert metrics["unknown_op_packets"] == 1 and metrics["unknown_conn_packets"] == 1
    assert not worker.mmio.read(c.MMIO_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
    assert worker.alive()


def test_transport_reset_command_fills_an_event_buffer(worker: VsockWorkerHarness) -> None:
    worker.guest.post_events(1)
    worker.send(VsockTransportReset(7))

    assert worker.expect(p.UpdateResult) == p.UpdateResult(7, True, "")
    worker.guest.wait_for(lambda: worker.guest.events)
    assert worker.guest.events == [EVENT_TRANSPORT_RESET.to_bytes(4, "little")]


def test_64_mib_host_to_guest_stream_through_the_worker(worker: VsockWorkerHarness) -> None:
    total = 64 << 20
    g = worker.guest
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{worker.uds_path}_53")
    listener.listen()
    try:
        g.send(1000, 53, Op.REQUEST, buf_alloc=4 << 20)
        g.take(Op.RESPONSE, port=1000)
        conn, _ = listener.accept()
        conn.setblocking(False)
        block = os.urandom(1 << 20)
        sent, got = hashlib.sha256(), hashlib.sha256()
        offset = received = fwd = 0
        while received < total:
            if offset < total:
                try:
                    n = conn.send(block[offset % len(block) :] if offset % len(block) else block)
                    sent.update(block[offset % len(block) : offset % len(block) + n])
                    offset += n
                except BlockingIOError:
                    pass
            worker.wait_interrupt(0.01)
            packets = g.collect()
            for pkt in packets:
                if pkt.op == Op.RW:
                    got.update(pkt.payload)
                    received += len(pkt.payload)
            if packets:
                g.post_rx(len(packets))
            if received - fwd >= 1 << 20:
                fwd = received
                g.send(1000, 53, Op.CREDIT_UPDATE, buf_alloc=4 << 20, fwd_cnt=fwd & 0xFFFFFFFF)
        conn.close()
    finally:
        listener.close()
    assert received == total and got.hexdigest() == sent.hexdigest()


def test_64_host_connections_at_once_each_keep_their_own_stream(worker: VsockWorkerHarness) -> None:
    g = worker.guest
    hosts = []
    try:
        for _ in range(64):
            host = socket.socket(socket.AF_UNIX)
            host.settimeout(5)
            host.connect(worker.uds_path)
            host.sendall(b"CONNECT 52\n")
            hosts.append(host)
        requests = g.wait_for(lambda: len([p for p in g.received if p.op == Op.REQUEST]) == 64 and g.received)
        ports = [pkt.header.src_port for pkt in requests if pkt.op == Op.REQUEST]
        assert len(set(ports)) == 64  # one host-side port each
        g.received.clear()
        for port in ports:
            g.send(52, port, Op.RESPONSE, kick=False)
        worker.kick(1)
        by_port = {}
        for host in hosts:
            port = int(read_line(host)[3:])
            by_port[port] = host
            host.sendall(f"hello from {port}".encode())
        payloads = g.wait_for(lambda: len([p for p in g.received if p.op == Op.RW]) >= 64 and g.received)
        for pkt in payloads:
            assert pkt.payload == f"hello from {pkt.header.src_port}".encode()
            g.send(52, pkt.header.src_port, Op.RW, b"echo " + pkt.payload, kick=False)
        worker.kick(1)
        for port, host in by_port.items():
            assert host.recv(100) == f"echo hello from {port}".encode()
        assert worker.metrics()["conns_open"] == 64
    finally:
        for host in hosts:
            host.close()

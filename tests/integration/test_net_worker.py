"""The net worker as a real process on a real TAP (in a throwaway network namespace), driven
from the host: rx/tx rings in the memfd, kicks on its ioeventfds, completions on its irqfd.
All addresses are link-local and live in the namespace."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from devices.net import packets as pk
from devices.net.tap import TapError
from devices.net.testing import GuestPeer, NetWorkerHarness, http_body, parse_reply
from shared import protocol as p
from shared.virtio import constants as c
from tests.support import netns

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and /dev/net/tun")

HOST_IP, GUEST_IP = "169.254.10.1", "169.254.10.2"
GUEST_MAC = bytes.fromhex("060000000a02")
TAP = "embtap0"
DATA = {"latest": {"meta-data": {"ami-id": "ami-1"}}}


@pytest.fixture
def ns() -> Iterator[netns.NetNs]:
    space = netns.NetNs(f"embervm-net-{os.getpid()}")
    try:
        space.add_tap(TAP, f"{HOST_IP}/24")
        space.ip("neigh", "add", GUEST_IP, "lladdr", GUEST_MAC.hex(":"), "dev", TAP)
        yield space
    finally:
        space.delete()


def tap_mac(ns: netns.NetNs) -> bytes:
    return bytes.fromhex(json.loads(ns.ip("-j", "link", "show", TAP))[0]["address"].replace(":", ""))


def udp_frame(dst_mac: bytes, payload: bytes, sport: int = 5000, dport: int = 6000) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = pk.ipv4(socket.inet_aton(GUEST_IP), socket.inet_aton(HOST_IP), 17, udp)
    return pk.ethernet(dst_mac, GUEST_MAC, pk.ETH_P_IP, ip)


def harness(launcher, ns: netns.NetNs, **kwargs: object) -> NetWorkerHarness:
    h = NetWorkerHarness(launcher.zygote, launcher.run_dir, ns.open_tap(TAP), guest_mac=GUEST_MAC.hex(":"), **kwargs)
    assert h.setup() & c.STATUS_DRIVER_OK
    return h


@pytest.fixture
def worker(launcher, ns: netns.NetNs) -> Iterator[NetWorkerHarness]:
    with harness(launcher, ns) as h:
        yield h


@pytest.fixture
def host_udp(ns: netns.NetNs) -> Iterator[socket.socket]:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST_IP, 6000))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_config_space_holds_the_mac(worker: NetWorkerHarness) -> None:
    assert bytes(worker.mmio.read(0x100 + i, 1) for i in range(6)) == GUEST_MAC
    features = worker.mmio.read(c.MMIO_DEVICE_FEATURES, 4)
    assert features & (1 << 5) and features & (1 << 15)  # MAC, MRG_RXBUF


def test_guest_frame_reaches_a_host_socket(worker: NetWorkerHarness, ns: netns.NetNs, host_udp: socket.socket) -> None:
    worker.send(udp_frame(tap_mac(ns), b"hello host"))

    data, (addr, port) = host_udp.recvfrom(100)
    assert (data, addr, port) == (b"hello host", GUEST_IP, 5000)
    m = worker.metrics()["net_eth0"]
    assert (m["tx_packets_count"], m["tx_bytes_count"]) == (1, len(udp_frame(bytes(6), b"hello host")))


def test_host_datagram_lands_in_a_guest_buffer(worker: NetWorkerHarness, ns: netns.NetNs) -> None:
    worker.add_rx_buffers(4)
    sender = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"hello guest", (GUEST_IP, 7000))
    sender.close()

    ((header, frame),) = worker.received(1)
    assert struct.unpack_from("<H", header, 10)[0] == 1  # num_buffers
    assert frame[:6] == GUEST_MAC and frame.endswith(b"hello guest")
    assert worker.metrics()["net_eth0"]["rx_packets_count"] == 1


def test_arp_request_is_answered_by_the_host(worker: NetWorkerHarness, ns: netns.NetNs) -> None:
    worker.add_rx_buffers(4)
    request = pk.arp(1, GUEST_MAC, socket.inet_aton(GUEST_IP), bytes(6), socket.inet_aton(HOST_IP))
    worker.send(pk.ethernet(pk.BROADCAST, GUEST_MAC, pk.ETH_P_ARP, request))

    ((_, frame),) = worker.received(1)
    reply = pk.parse_arp(pk.parse_ethernet(frame).payload)
    assert (reply.op, reply.sender_ip, reply.sender_mac) == (2, socket.inet_aton(HOST_IP), tap_mac(ns))


def test_frames_wait_while_the_guest_has_no_buffers(worker: NetWorkerHarness, ns: netns.NetNs) -> None:
    sender = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(3):
        sender.sendto(b"queued %d" % i, (GUEST_IP, 7000))
    sender.close()
    assert not worker.wait_interrupt(0.2)  # nowhere to put them yet

    worker.add_rx_buffers(8)

    frames = [frame for _, frame in worker.received(3)]
    assert [f[-8:] for f in frames] == [b"queued 0", b"queued 1", b"queued 2"]
    assert worker.metrics()["net_eth0"]["no_rx_avail_buffer"] >= 1


def test_a_frame_bigger_than_a_non_mergeable_buffer_is_dropped_and_counted(
    worker: NetWorkerHarness, ns: netns.NetNs
) -> None:
    worker.add_rx_buffers(2, size=256)  # MRG_RXBUF not negotiated: one buffer per frame
    sender = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"x" * 1000, (GUEST_IP, 7000))
    sender.sendto(b"small", (GUEST_IP, 7000))
    sender.close()

    ((_, frame),) = worker.received(1)
    assert frame.endswith(b"small")
    assert worker.metrics()["net_eth0"]["rx_dropped_frames"] == 1


def test_mergeable_buffers_take_a_frame_in_pieces(launcher, ns: netns.NetNs) -> None:
    features = c.feature(c.VIRTIO_F_VERSION_1) | c.feature(15)  # MRG_RXBUF
    with NetWorkerHarness(launcher.zygote, launcher.run_dir, ns.open_tap(TAP), guest_mac=GUEST_MAC.hex(":")) as h:
        assert h.setup(features) & c.STATUS_DRIVER_OK
        h.add_rx_buffers(8, size=512)
        sender = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.sendto(bytes(range(256)) * 5, (GUEST_IP, 7000))
        sender.close()

        used = h.wait_used(h.rx, 1)
        used += h.wait_used(h.rx, 3 - len(used)) if len(used) < 3 else []
        data = b"".join(b"".join(h.rx.written(head))[:n] for head, n in used)
        assert struct.unpack_from("<H", data, 10)[0] == len(used) == 3  # 12 + 42 + 1280 bytes in 512-byte buffers
        assert data[12:].endswith(bytes(range(256)) * 5)


@pytest.mark.parametrize(
    "readable",
    [[b"\x00" * 5], [b"\x00" * 12], [bytes(12), bytes(65551)], [bytes(6), bytes(3), bytes(3)]],
    ids=["truncated-header", "header-only", "oversized", "split-header"],
)
def test_malformed_tx_frames_never_stop_the_worker(
    worker: NetWorkerHarness, ns: netns.NetNs, host_udp: socket.socket, readable: list[bytes]
) -> None:
    assert worker.send_raw(readable)[0][1] == 0
    worker.send(udp_frame(tap_mac(ns), b"still here"))

    assert host_udp.recvfrom(100)[0] == b"still here"
    assert worker.alive()


def test_chain_with_only_writable_buffers_on_tx_is_malformed(worker: NetWorkerHarness) -> None:
    worker.tx.add_chain([], [64])
    worker.kick(1)
    worker.wait_used(worker.tx, 1)
    assert worker.metrics()["net_eth0"]["tx_malformed_frames"] == 1


def test_tx_rate_limiter_delays_frames_and_can_be_updated(launcher, ns: netns.NetNs, host_udp: socket.socket) -> None:
    limiter = {"bandwidth": {"size": 1000, "refill_time": 100}}  # 10 kB/s
    with harness(launcher, ns, tx_rate_limiter=limiter) as h:
        frames = [udp_frame(tap_mac(ns), bytes([i]) * 700) for i in range(3)]
        for f in frames:
            h.tx.add_chain([bytes(12) + f])
        start = time.monotonic()
        h.kick(1)
        h.wait_used(h.tx, 3)
        assert time.monotonic() - start >= 0.1  # the later frames waited for tokens
        assert h.metrics()["net_eth0"]["tx_rate_limiter_throttled"] >= 1
        h.send_control(p.UpdateNetRateLimiters(7, None, {"bandwidth": {"size": 10**9, "refill_time": 1}}))
        result = h.expect(p.UpdateResult)
        assert (result.request_id, result.ok) == (7, True)
        h.send_control(p.UpdateNetRateLimiters(8, {"bandwidth": {"size": "x"}}, None))
        assert not h.expect(p.UpdateResult).ok


# --- MMDS through the worker ------------------------------------------------------------------


@pytest.fixture
def mmds_worker(launcher, ns: netns.NetNs) -> Iterator[NetWorkerHarness]:
    config = {"version": "V2", "ipv4_address": None, "imds_compat": False, "document": json.dumps(DATA).encode()}
    with harness(launcher, ns, mmds=config) as h:
        h.add_rx_buffers(64)
        yield h


def capture(ns: netns.NetNs) -> socket.socket:
    sniffer = ns.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sniffer.bind((TAP, 0x0003))  # ETH_P_ALL
    sniffer.setblocking(False)
    return sniffer


def captured(sniffer: socket.socket) -> list[bytes]:
    frames = []
    while True:
        try:
            frames.append(sniffer.recv(65536))
        except BlockingIOError:
            return frames


def test_mmds_v2_session_over_the_worker_never_touches_the_tap(mmds_worker: NetWorkerHarness, ns: netns.NetNs) -> None:
    sniffer = capture(ns)
    g = GuestPeer(mmds_worker.mmds_transport, mac=GUEST_MAC, ip=socket.inet_aton(GUEST_IP))
    (arp_reply,) = g.arp()
    assert pk.parse_arp(pk.parse_ethernet(arp_reply).payload).sender_ip == bytes([169, 254, 169, 254])
    g.connect()
    status, _, token = http_body(
        g.request("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n")
    )
    assert status == 200
    g.received.clear()
    get = f"GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\nX-metadata-token: {token.decode()}\r\n\r\n"
    assert json.loads(http_body(g.request(get))[2]) == DATA["latest"]["meta-data"]
    g.received.clear()
    assert http_body(g.request("GET /latest/meta-data HTTP/1.1\r\n\r\n"))[0] == 401

    time.sleep(0.05)
    leaked = [f for f in captured(sniffer) if bytes([169, 254, 169, 254]) in f]
    sniffer.close()
    assert not leaked
    groups = mmds_worker.metrics()
    assert groups["mmds"]["connections_created"] == 1 and groups["mmds"]["rx_no_token"] == 1
    assert groups["net_eth0"]["tx_packets_count"] == 0  # nothing went to the TAP


def test_mmds_snapshot_pushed_at_run_time_is_served(mmds_worker: NetWorkerHarness) -> None:
    mmds_worker.send_control(p.MmdsData(json.dumps({"latest": {"v": "new"}}).encode()))
    g = GuestPeer(mmds_worker.mmds_transport, mac=GUEST_MAC, ip=socket.inet_aton(GUEST_IP))
    g.connect()
    _, _, token = http_body(g.request("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n"))
    g.received.clear()
    assert http_body(g.request(f"GET /latest/v HTTP/1.1\r\nX-metadata-token: {token.decode()}\r\n\r\n"))[2] == b"new"


def test_garbage_to_the_mmds_address_never_stops_the_worker(mmds_worker: NetWorkerHarness) -> None:
    mmds_ip = bytes([169, 254, 169, 254])
    bad_ip = pk.ethernet(bytes(6), GUEST_MAC, pk.ETH_P_IP, b"\x45" + bytes(15) + mmds_ip + bytes(4))
    bad_tcp = pk.ethernet(
        bytes(6), GUEST_MAC, pk.ETH_P_IP, pk.ipv4(socket.inet_aton(GUEST_IP), mmds_ip, 6, b"\x00" * 7)
    )
    for frame in (bad_ip, bad_tcp, bad_tcp + bytes(60000)):
        mmds_worker.send(frame)
    g = GuestPeer(mmds_worker.mmds_transport, mac=GUEST_MAC, ip=socket.inet_aton(GUEST_IP))
    g.connect()
    assert mmds_worker.alive() and mmds_worker.metrics()["mmds"]["rx_bad_eth"] >= 2


# --- opening TAPs ------------------------------------------------------------------------------


def test_tap_names_and_busy_taps_get_firecrackers_errors(ns: netns.NetNs) -> None:
    with pytest.raises(TapError, match=r"^Open tap device failed: Invalid interface name$"):
        ns.open_tap("x" * 16)  # IFNAMSIZ - 1 bytes at most
    created = ns.open_tap("nosuchtap0")  # as root the kernel creates a missing TAP, as for Firecracker
    os.close(created)
    fd = ns.open_tap(TAP)
    try:
        with pytest.raises(TapError, match=r"Device or resource busy \(os error 16\)\. Invalid TUN/TAP Backend"):
            ns.open_tap(TAP)
    finally:
        os.close(fd)


def test_a_gso_frame_spreads_over_mergeable_buffers_with_offloads_on_the_tap(launcher, ns: netns.NetNs) -> None:
    features = sum(c.feature(b) for b in (c.VIRTIO_F_VERSION_1, 1, 7, 15))  # GUEST_CSUM, GUEST_TSO4, MRG_RXBUF
    payload = bytes(range(256)) * 78  # 19968 bytes: one TCP segment the TAP may hand over unsegmented
    segment = pk.tcp(socket.inet_aton(HOST_IP), socket.inet_aton(GUEST_IP), 80, 4000, 1, 1, pk.TCP_ACK, 65535, payload)
    ip = pk.ipv4(socket.inet_aton(HOST_IP), socket.inet_aton(GUEST_IP), pk.IPPROTO_TCP, segment)
    frame = pk.ethernet(GUEST_MAC, tap_mac(ns), pk.ETH_P_IP, ip)
    gso = struct.pack("<BBHHHH", 0, 1, 54, 1448, 0, 0)  # TCPv4 GSO, checksum already complete
    with NetWorkerHarness(launcher.zygote, launcher.run_dir, ns.open_tap(TAP), guest_mac=GUEST_MAC.hex(":")) as h:
        assert h.setup(features) & c.STATUS_DRIVER_OK  # the worker set TUNSETOFFLOAD CSUM|TSO4
        h.add_rx_buffers(16, size=4096)
        sender = ns.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sender.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR: frames carry a virtio-net header
        sender.bind((TAP, 0))
        sender.send(gso + frame)
        sender.close()

        used = h.wait_used(h.rx, 1)
        while sum(n for _, n in used) < len(frame) + 12:
            used += h.wait_used(h.rx, 1)
        data = b"".join(b"".join(h.rx.written(head))[:n] for head, n in used)
        assert struct.unpack_from("<H", data, 10)[0] == len(used) == 5  # 12 + 20022 bytes in 4 KiB buffers
        assert data[1] == 1  # gso_type TCPV4 kept: one frame went to the guest, not 14 segments
        body = data[12:]
        assert len(body) == len(frame) and body[:50] + body[52:] == frame[:50] + frame[52:]  # (the kernel
        # may turn the TCP checksum into a partial one for the guest to finish: VIRTIO_NET_HDR_F_NEEDS_CSUM)


# --- TCP edge cases, frames written straight into the worker's tx queue ----------------------


def peer(worker: NetWorkerHarness, port: int = 40000) -> GuestPeer:
    return GuestPeer(worker.mmds_transport, port=port, mac=GUEST_MAC, ip=socket.inet_aton(GUEST_IP))


def test_mmds_out_of_order_segment_is_re_acked_then_the_request_completes(mmds_worker: NetWorkerHarness) -> None:
    g = peer(mmds_worker)
    g.connect()
    token = http_body(g.request("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 9\r\n\r\n"))[2]
    g.received.clear()
    first = f"GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token.decode()}\r\n".encode()
    (dup,) = g.send(pk.TCP_ACK, b"\r\n", seq=g.seq + len(first))
    assert dup.ack == g.seq and not dup.payload
    g.send(pk.TCP_ACK, first)
    assert http_body(g.request("\r\n"))[::2] == (200, b"ami-1")


def test_mmds_rst_and_half_close(mmds_worker: NetWorkerHarness) -> None:
    g = peer(mmds_worker)
    g.connect()
    g.send(pk.TCP_RST)
    (rst,) = g.send(pk.TCP_ACK, b"GET / HTTP/1.1\r\n\r\n")  # the connection is gone
    assert rst.flags & pk.TCP_RST
    h = peer(mmds_worker, 40001)
    h.connect()
    raw = h.request("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 9\r\n\r\n", fin=True)
    assert http_body(raw)[0] == 200 and h.fin_seen  # answered after our FIN, then closed
    assert mmds_worker.metrics()["mmds"]["connections_destroyed"] == 2


def test_mmds_zero_window_is_probed_then_resumed(mmds_worker: NetWorkerHarness) -> None:
    g = peer(mmds_worker)
    g.connect()
    g.window = 0
    replies = g.send(
        pk.TCP_ACK | pk.TCP_PSH, b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 9\r\n\r\n"
    )
    assert not any(r.payload for r in replies)
    ((_, probe_frame),) = mmds_worker.received(1, timeout=3)  # the retransmission timer's probe
    mmds_worker.add_rx_buffers(1)
    probe = parse_reply(probe_frame)
    assert probe is not None and len(probe.payload) == 1
    g.absorb([probe])
    g.window = 65535
    assert http_body(g.request(""))[0] == 200


def test_mmds_too_large_request_resets_the_connection(mmds_worker: NetWorkerHarness) -> None:
    g = peer(mmds_worker)
    g.connect()
    g.send(pk.TCP_ACK, b"GET / HTTP/1.1\r\nX-Pad: ")
    while not g.rst_seen and g.seq < 1001 + 20000:
        g.send(pk.TCP_ACK, b"a" * 1400)
    assert g.rst_seen and mmds_worker.alive()
    assert mmds_worker.metrics()["mmds"]["connections_reset"] == 1

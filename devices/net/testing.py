"""The guest's side of MMDS conversations, for tests and benchmarks: frames in, frames out.

`GuestPeer` builds the frames a guest stack would send (ARP, TCP segments to the MMDS
address) and parses what comes back. `transport` is any callable that delivers one guest
frame and returns the frames produced in answer (the stack directly, or a net worker's tx
queue + rx queue through `NetWorkerHarness`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devices.net import packets as pk
from devices.net.stack import DEFAULT_IPV4, HTTP_PORT
from shared.device_kinds import NET
from shared.devworker_harness import Spawner, WorkerHarness
from shared.layout import MiB
from shared.virtio import constants as c
from shared.virtio.testing import MockDriver, mmio_setup

GUEST_MAC = bytes.fromhex("06000000aa01")
GUEST_IP = bytes([169, 254, 0, 2])

Transport = Callable[[bytes], list[bytes]]


@dataclass
class Reply:
    flags: int
    seq: int
    ack: int
    window: int
    payload: bytes
    mss: int | None


def parse_reply(frame: bytes) -> Reply | None:
    """A TCP segment from the MMDS in `frame`, or None (e.g. an ARP reply)."""
    eth = pk.parse_ethernet(frame)
    if eth.ethertype != pk.ETH_P_IP:
        return None
    packet = pk.parse_ipv4(eth.payload)
    seg = pk.parse_tcp(packet.payload)
    return Reply(seg.flags, seg.seq, seg.ack, seg.window, seg.payload, seg.mss)


@dataclass
class GuestPeer:
    transport: Transport
    port: int = 40000
    mac: bytes = GUEST_MAC
    ip: bytes = GUEST_IP
    mmds_ip: bytes = DEFAULT_IPV4
    seq: int = 1000
    ack: int = 0
    window: int = 65535
    received: bytearray = field(default_factory=bytearray)
    replies: list[Reply] = field(default_factory=list)
    fin_seen: bool = False
    rst_seen: bool = False

    def arp(self) -> list[bytes]:
        request = pk.arp(1, self.mac, self.ip, bytes(6), self.mmds_ip)
        return self.transport(pk.ethernet(pk.BROADCAST, self.mac, pk.ETH_P_ARP, request))

    def frame(self, flags: int, payload: bytes = b"", seq: int | None = None, mss: int | None = None) -> bytes:
        segment = pk.tcp(
            self.ip, self.mmds_ip, self.port, HTTP_PORT, self.seq if seq is None else seq, self.ack, flags,
            self.window, payload, mss,
        )  # fmt: skip
        return pk.ethernet(bytes(6), self.mac, pk.ETH_P_IP, pk.ipv4(self.ip, self.mmds_ip, pk.IPPROTO_TCP, segment))

    def send(self, flags: int, payload: bytes = b"", seq: int | None = None, mss: int | None = None) -> list[Reply]:
        """Send one segment; absorb the answers (in-order data, FIN, RST); return them."""
        replies = [r for f in self.transport(self.frame(flags, payload, seq, mss)) if (r := parse_reply(f))]
        if seq is None:
            self.seq += len(payload) + (1 if flags & (pk.TCP_SYN | pk.TCP_FIN) else 0)
        self.absorb(replies)
        return replies

    def absorb(self, replies: list[Reply]) -> None:
        for r in replies:
            self.replies.append(r)
            if r.flags & pk.TCP_RST:
                self.rst_seen = True
                continue
            if r.flags & pk.TCP_SYN:
                self.ack = (r.seq + 1) & 0xFFFFFFFF
                continue
            if r.seq == self.ack and r.payload:
                self.received += r.payload
                self.ack = (self.ack + len(r.payload)) & 0xFFFFFFFF
            if r.flags & pk.TCP_FIN and r.seq + len(r.payload) == self.ack:
                self.ack = (self.ack + 1) & 0xFFFFFFFF
                self.fin_seen = True

    def connect(self) -> Reply:
        (syn_ack,) = self.send(pk.TCP_SYN, mss=1460)
        assert syn_ack.flags == pk.TCP_SYN | pk.TCP_ACK, syn_ack
        self.send(pk.TCP_ACK)
        return syn_ack

    def request(self, text: str, *, fin: bool = False) -> bytes:
        """Send an HTTP request (ACKing every data segment) and return all bytes received."""
        flags = pk.TCP_ACK | pk.TCP_PSH | (pk.TCP_FIN if fin else 0)
        replies = self.send(flags, text.encode())
        while any(r.payload or r.flags & pk.TCP_FIN for r in replies) and not self.rst_seen:
            replies = self.send(pk.TCP_ACK)
        return bytes(self.received)


def http_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the first response in `raw`."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, rest[: int(headers.get("content-length", "0"))]


# --- a real net worker, driven from the host ------------------------------------------------


VNET_HDR = bytes(12)
RX, TX = 0, 1


class NetWorkerHarness(WorkerHarness):
    """One net worker on `tap_fd`, with the guest (rx/tx MockDrivers) and supervisor played here.

    The harness takes ownership of `tap_fd`'s copy it passes (it closes it after the spawn).
    """

    def __init__(
        self,
        zygote: Spawner,
        run_dir: str,
        tap_fd: int,
        *,
        iface_id: str = "eth0",
        guest_mac: str | None = "06:00:00:00:aa:01",
        mmds: dict[str, Any] | None = None,
        rx_rate_limiter: dict[str, Any] | None = None,
        tx_rate_limiter: dict[str, Any] | None = None,
        mem_size: int = 64 * MiB,
        queue_size: int = 256,
        seccomp: dict[str, Any] | None = None,
    ) -> None:
        name = NET.worker_name(iface_id)
        args: dict[str, Any] = {
            "iface_id": iface_id,
            "guest_mac": guest_mac,
            "rx_rate_limiter": rx_rate_limiter,
            "tx_rate_limiter": tx_rate_limiter,
            "mmds": mmds,
        }
        if seccomp is not None:
            args["seccomp"] = seccomp
        super().__init__(
            zygote,
            "net",
            name,
            f"ipc://{run_dir}/{name}",
            mem_size=mem_size,
            args=args,
            backend_fds=[tap_fd],
        )
        self.rx = MockDriver(self.mem, size=queue_size, base=0x10000, data_size=24 * MiB)
        self.tx = MockDriver(self.mem, size=queue_size, base=0x10000 + 28 * MiB, data_size=24 * MiB)

    # --- the guest's side ------------------------------------------------------------------

    def setup(self, features: int = c.feature(c.VIRTIO_F_VERSION_1)) -> int:
        return mmio_setup(self.mmio, [self.rx, self.tx], features)  # type: ignore[arg-type]

    def add_rx_buffers(self, count: int, size: int = 2048) -> list[int]:
        heads = [self.rx.add_chain([], [size]) for _ in range(count)]
        self.kick(RX)
        return heads

    def send(self, *frames: bytes, header: bytes = VNET_HDR) -> list[tuple[int, int]]:
        """Queue `frames` (each behind a virtio-net header) on tx; wait until all are used."""
        heads = [self.tx.add_chain([header + frame]) for frame in frames]
        self.kick(TX)
        return self.wait_used(self.tx, len(heads))

    def send_raw(self, readable: list[bytes]) -> list[tuple[int, int]]:
        """One tx chain made of exactly these buffers (for malformed frames)."""
        self.tx.add_chain(readable)
        self.kick(TX)
        return self.wait_used(self.tx, 1)

    def wait_used(self, driver: MockDriver, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        entries: list[tuple[int, int]] = []
        while True:
            entries += driver.used()
            if len(entries) >= count:
                return entries
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_interrupt(remaining):
                raise TimeoutError(f"{len(entries)} of {count} buffers used within {timeout} s")

    def received(self, count: int, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        """The next `count` frames the device put in rx buffers: (virtio-net header, frame)."""
        frames = []
        for head, length in self.wait_used(self.rx, count, timeout):
            data = b"".join(self.rx.written(head))[:length]
            frames.append((data[:12], data[12:]))
        return frames

    def mmds_transport(self, frame: bytes) -> list[bytes]:
        """`GuestPeer` transport: send one frame on tx; the worker puts MMDS answers in the rx
        ring before it marks the frame sent, so what is there now is the whole answer."""
        self.send(frame)
        out = []
        while entries := self.rx.used():
            for head, length in entries:
                out.append(b"".join(self.rx.written(head))[12:length])
            self.add_rx_buffers(len(entries))
        return out

    # --- the supervisor's side ---------------------------------------------------------------

    def metrics(self) -> dict[str, dict[str, int]]:
        return self.metric_groups()
